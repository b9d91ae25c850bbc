"""`SteeringVector.from_contrast(..., remote=True)` on a real NDIF server.

The reads run on the server, one remote trace per batch, and only each batch's
readings, `(batch, width)` per module, come back; the vectors are aggregated
here. They must equal a local run's on the same checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from nnsight_toolbox import InterventionSet, SteeringVector
from nnsight_toolbox.optim.contrast import read_contrast

pytestmark = pytest.mark.remote

POSITIVE = ["Q: Is it kind? A: (A", "I love this film", "yes", "The answer is A", "good"]
NEGATIVE = ["Q: Is it kind? A: (B", "I hate this film", "no", "The answer is B", "bad!"]
PATHS = ["model.layers.1", "model.layers.0"]  # out of forward order on purpose


@pytest.mark.parametrize("method", ["mean", "pca_diff"])
def test_vectors_read_remotely_equal_a_local_run(remote_model, local_model, method):
    remote = SteeringVector.from_contrast([remote_model.get(p) for p in PATHS], POSITIVE, NEGATIVE, method=method, batch_size=4, remote=True)
    local = SteeringVector.from_contrast([local_model.get(p) for p in PATHS], POSITIVE, NEGATIVE, method=method, batch_size=4)
    assert isinstance(remote, InterventionSet) and [v.path for v in remote] == [v.path for v in local]
    for r, l in zip(remote, local):
        assert l.v.norm() > 1e-3  # a real direction
        torch.testing.assert_close(r.v.detach().cpu(), l.v.detach().cpu(), atol=1e-5, rtol=1e-4)
        assert r.metadata == l.metadata


def test_the_per_prompt_readings_come_back_as_a_local_run_reads_them(remote_model, local_model):
    remote_pos, remote_neg = read_contrast(remote_model.get(PATHS[1]), POSITIVE, NEGATIVE, positions=1, batch_size=3, remote=True)
    local_pos, local_neg = read_contrast(local_model.get(PATHS[1]), POSITIVE, NEGATIVE, positions=1, batch_size=3)
    assert remote_pos[0].shape == (len(POSITIVE), local_pos[0].shape[1])
    torch.testing.assert_close(remote_pos[0], local_pos[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(remote_neg[0], local_neg[0], atol=1e-5, rtol=1e-4)
