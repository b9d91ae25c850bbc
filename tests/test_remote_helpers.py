"""`nnsight_toolbox.remote.save_weights`, run locally (tests/remote/ runs it on a real NDIF server)."""

import pytest
import torch
from conftest import randomize

from nnsight_toolbox import LORA
from nnsight_toolbox.remote import save_weights


def test_save_weights_snapshots_the_weights_at_the_end_of_a_session(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    with gpt2.session():
        weights = save_weights(lora)
    assert set(weights) == {"WA", "WB"}
    assert all(not tensor.requires_grad for tensor in weights.values())
    assert torch.equal(weights["WB"], lora.WB) and weights["WB"].data_ptr() != lora.WB.data_ptr()

    with torch.no_grad():
        lora.WB.zero_()  # a later change does not reach the snapshot ...
    assert weights["WB"].abs().sum() > 0
    lora.load_state_dict(weights)  # ... and loading it brings the weights back, in place
    assert torch.equal(lora.WB, weights["WB"])


def test_save_weights_outside_a_session_says_what_to_do(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    with pytest.raises(RuntimeError, match=r"inside `model.session\(...\)` or `model.trace\(...\)`.*`adapter.state_dict\(\)`"):
        save_weights(lora)
