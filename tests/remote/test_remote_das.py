"""A trained `RotatedSpace` swaps remotely as it does locally, on a real NDIF server.

The source and the base are two invokes of one remote trace; the server runs the
package's code shipped by value (it has no copy installed), so the pairing of
rows and positions, and the rotation's matrix-exp map, run there from source.
"""

from __future__ import annotations

import pytest
import torch

from nnsight_toolbox import BoundlessRotatedSpace, RotatedSpace

pytestmark = pytest.mark.remote

SOURCE = ["The Eiffel Tower is in", "Rome is"]
BASE = ["Big Ben is in the city of", "Madrid is in"]


def trained_pair(make, remote_model, local_model, seed):
    """A swap on the served model whose rotation is off its init (as after training), and its local twin."""
    generator = torch.Generator().manual_seed(seed)
    remote = make(remote_model.get("model.layers.1"))
    with torch.no_grad():
        for parameter in remote.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    if hasattr(remote, "temperature"):
        remote.temperature = 2.0
    local = make(local_model.get("model.layers.1"))
    local.load_state_dict(remote.state_dict())
    return remote, local


def swap(model, das, remote):
    with model.trace(remote=remote) as tracer:
        with tracer.invoke(SOURCE):
            src = das.source(positions=[0, -1])
        with tracer.invoke(BASE):
            das(src, positions=[1, -1])
            logits = model.lm_head.output.save()
    return logits


@pytest.mark.parametrize("make", [lambda m: RotatedSpace(m, k=8), BoundlessRotatedSpace], ids=["rotated", "boundless"])
def test_a_swap_between_invokes_runs_remotely_as_locally(remote_model, local_model, make):
    remote, local = trained_pair(make, remote_model, local_model, seed=4)
    remote_logits = swap(remote_model, remote, True)
    local_logits = swap(local_model, local, False)
    with local_model.trace() as tracer:
        with tracer.invoke(SOURCE):
            pass
        with tracer.invoke(BASE):
            base = local_model.lm_head.output.save()
    assert torch.allclose(remote_logits, local_logits, atol=1e-5)
    assert not torch.allclose(remote_logits, base, atol=1e-3)  # the swap did act
