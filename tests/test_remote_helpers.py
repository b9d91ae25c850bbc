"""`nnsight_toolbox.remote`, run locally (tests/remote/ runs it on a real NDIF server).

``remote="local"`` is nnsight's own dry run of a remote request: the block is
serialized as for NDIF, then rebuilt against the model's server-side objects
and run in this process.
"""

import pytest
import torch
from conftest import load, randomize

from nnsight_toolbox import LORA, SteeringVector
from nnsight_toolbox.remote import save_weights
from nnsight_toolbox.testing import load_tiny_model


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


def run_remotely(model, intervention, how: str):
    """``intervention()`` in a trace of ``model`` sent as a remote request (nnsight's local dry run)."""
    if how == "trace":
        with model.trace("Hello world", remote="local"):
            intervention()
            logits = model.lm_head.output.save()
    else:
        with model.session(remote="local"):
            with model.trace("Hello world"):
                intervention()
                logits = model.lm_head.output.save()
    return logits


@pytest.mark.parametrize("how", ["trace", "session"])
def test_an_intervention_on_a_module_the_traced_model_lacks_fails_before_sending(gpt2, model_paths, how, monkeypatch):
    """Not the server's "model architecture on this server doesn't match", which blames package versions."""
    from nnsight.schema.request import RequestModel

    monkeypatch.setattr(RequestModel, "deserialize", lambda *args, **kwargs: pytest.fail("the request was sent"))
    llama = load(model_paths["llama"])
    steer = SteeringVector(llama.model.layers[0].mlp)
    with pytest.raises(ValueError) as raised:
        run_remotely(gpt2, steer, how)
    message = str(raised.value)
    assert "`SteeringVector` acts on `model.model.layers.0.mlp` of another model" in message
    assert "has no module at `model.model.layers.0.mlp`" in message
    assert "Build the `SteeringVector` on a module of the model you trace" in message


@pytest.mark.parametrize("how", ["trace", "session"])
def test_a_module_of_another_kind_or_width_at_the_same_path_fails_before_sending(model_paths, how):
    llama, qwen2 = load(model_paths["llama"]), load(model_paths["qwen2"])
    with pytest.raises(ValueError, match=r"has a `Qwen2MLP` at `model.model.layers.0.mlp`, not the `LlamaMLP` it was built on"):
        run_remotely(qwen2, LORA(llama.model.layers[0].mlp, r=4), how)
    wide = load_tiny_model("gpt2", hidden=64)  # the fixtures' GPT-2 is 32 wide
    with pytest.raises(ValueError, match=r"has a module at `model.transformer.h.0.mlp` whose `c_fc.bias` is \(128,\), not \(256,\)"):
        run_remotely(load(model_paths["gpt2"]), LORA(wide.transformer.h[0].mlp, r=4), how)


@pytest.mark.parametrize("how", ["trace", "session"])
def test_an_intervention_on_the_traced_model_is_sent_and_runs_as_locally(gpt2, how):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    with gpt2.trace("Hello world"):
        lora()
        local = gpt2.lm_head.output.save()
    torch.testing.assert_close(run_remotely(gpt2, lora, how), local)
