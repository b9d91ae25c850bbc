"""A kind written outside the package (tests/own_kind.py) runs on a real NDIF server, shipped by value.

The server does not have the package, nor the test's module: both travel with the
request once registered, as a user's own module does after `nnsight.register`.
"""

from __future__ import annotations

import nnsight
import own_kind
import pytest
import torch
from conftest import hf_logits
from own_kind import PerChannelScale

pytestmark = pytest.mark.remote

PROMPT = "The Eiffel Tower is in"
LAYER = "model.layers.0"


def test_a_users_kind_gives_the_same_logits_remotely_as_locally(remote_model, local_model):
    nnsight.register(own_kind)  # a module of the user's own: ship it by value, as the package is
    remote = PerChannelScale(remote_model.get(LAYER))
    with torch.no_grad():
        remote.s.copy_(torch.randn(remote.s.shape, generator=torch.Generator().manual_seed(0)))
    local = PerChannelScale(local_model.get(LAYER))
    local.load_state_dict(remote.state_dict())

    with remote_model.trace(PROMPT, remote=True):
        remote(alpha=0.5, positions=[0, -1])
        remote_logits = remote_model.lm_head.output.save()
    with local_model.trace(PROMPT):
        local(alpha=0.5, positions=[0, -1])
        local_logits = local_model.lm_head.output.save()

    assert torch.allclose(remote_logits, local_logits, atol=1e-5)
    assert not torch.allclose(remote_logits, hf_logits(local_model, PROMPT), atol=1e-3)  # it did act
