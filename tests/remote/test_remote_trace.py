"""`lora()` in remote traces and generation, against a real NDIF stack.

Each remote result is compared with the same computation run locally, and the
adapted ones also with an independent reference (a torch hook on the raw module).
"""

from __future__ import annotations

import time

import nnsight
import pytest
import torch
from conftest import hf_generate, hf_logits, load, randomize, randomized, reference_hook, reference_hooks
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

from nnsight_toolbox import LORA

from .conftest import TARGET

pytestmark = pytest.mark.remote

PROMPT = "The Eiffel Tower is in"
PROMPTS = ["Hello world", "The Eiffel Tower is in"]


def lora_pair(remote_model, local_model, seed: int = 0, scale: float = 2.0, **kwargs):
    """An adapter on the served model and one with the same weights on the local copy."""
    remote = LORA(remote_model.get(TARGET), r=4, **kwargs)
    randomize(remote, seed=seed, scale=scale)
    local = LORA(local_model.get(TARGET), r=4, **kwargs)
    local.load_state_dict(remote.state_dict())
    return remote, local


def remote_base_logits(remote_model) -> torch.Tensor:
    with remote_model.trace(PROMPT, remote=True):
        logits = remote_model.lm_head.output.save()
    return logits


def test_trace_logits_match_local(remote_model, local_model):
    lora, local_lora = lora_pair(remote_model, local_model)
    with remote_model.trace(PROMPT, remote=True):
        lora(alpha=0.5)
        logits = remote_model.lm_head.output.save()
    with local_model.trace(PROMPT):
        local_lora(alpha=0.5)
        local_logits = local_model.lm_head.output.save()
    with reference_hook(local_model, TARGET, lora.WA.detach(), lora.WB.detach(), alpha=0.5):
        reference = hf_logits(local_model, PROMPT)

    assert torch.allclose(logits, local_logits, atol=1e-5)
    assert torch.allclose(logits, reference, atol=1e-5)
    assert not torch.allclose(logits, hf_logits(local_model, PROMPT), atol=1e-3)  # the adapter did act


def test_per_invoke_scope_in_one_remote_batch(remote_model, local_model):
    lora, _ = lora_pair(remote_model, local_model)
    with remote_model.trace(remote=True) as tracer:
        with tracer.invoke(PROMPT):
            lora()
            adapted = remote_model.lm_head.output.save()
        with tracer.invoke(PROMPT):
            base = remote_model.lm_head.output.save()
    with reference_hook(local_model, TARGET, lora.WA.detach(), lora.WB.detach()):
        reference = hf_logits(local_model, PROMPT)
    assert torch.allclose(adapted, reference, atol=1e-5)
    assert torch.allclose(base, hf_logits(local_model, PROMPT), atol=1e-5)


def test_generation_with_an_adapted_and_a_base_invoke(remote_model, local_model):
    lora, _ = lora_pair(remote_model, local_model)
    steps = 5
    with remote_model.generate(max_new_tokens=steps, do_sample=False, remote=True) as tracer:
        with tracer.invoke(PROMPT):
            lora()
        with tracer.invoke(PROMPT):
            pass
        with tracer.invoke():
            ids = tracer.result.save()

    # Token for token: the adapter acts on the prefill and every generated step.
    with reference_hook(local_model, TARGET, lora.WA.detach(), lora.WB.detach()):
        adapted = hf_generate(local_model, PROMPT, steps)
    base = hf_generate(local_model, PROMPT, steps)
    assert not torch.equal(adapted, base), "the test adapter should change the greedy continuation"
    assert torch.equal(ids[0], adapted[0])
    assert torch.equal(ids[1], base[0])


def test_a_set_of_adapters_acts_remotely_as_hooks_do_locally(remote_model, local_model):
    """`LORA.on(...)` on the served model: one call switches every adapter on, in trace and generation."""
    adapters = randomized(LORA.on(remote_model, ["q_proj", "v_proj"], r=4), scale=2.0)
    assert len(adapters) == 4  # two layers
    with remote_model.trace(PROMPT, remote=True):
        adapters(alpha=0.5)
        logits = remote_model.lm_head.output.save()
    steps = 5
    with remote_model.generate(PROMPT, max_new_tokens=steps, do_sample=False, remote=True) as tracer:
        adapters()
        ids = tracer.result.save()

    with reference_hooks(local_model, adapters, alpha=0.5):
        reference = hf_logits(local_model, PROMPT)
    with reference_hooks(local_model, adapters):
        adapted = hf_generate(local_model, PROMPT, steps)
    assert not torch.allclose(reference, hf_logits(local_model, PROMPT), atol=1e-3), "the adapters should act"
    assert not torch.equal(adapted, hf_generate(local_model, PROMPT, steps)), "and change the continuation"
    assert torch.allclose(logits, reference, atol=1e-5)
    assert torch.equal(ids, adapted)


def test_non_blocking_request(remote_model, local_model):
    lora, local_lora = lora_pair(remote_model, local_model)
    with remote_model.trace(PROMPT, remote=True, blocking=False) as tracer:
        lora()
        logits = remote_model.lm_head.output.save()
    backend = tracer.backend
    assert isinstance(backend, RemoteBackend) and backend.job_id is not None

    result, deadline = None, time.monotonic() + 120
    while result is None:  # poll the stored status until the result lands
        assert time.monotonic() < deadline, f"non-blocking job {backend.job_id} not done; last status {backend.status}"
        result = backend()
        if result is None:
            time.sleep(0.2)

    with local_model.trace(PROMPT):
        local_lora()
        local_logits = local_model.lm_head.output.save()
    assert torch.allclose(result["logits"], local_logits, atol=1e-5)


def test_the_next_request_computes_the_base_model_exactly(remote_model, local_model):
    """The server keeps one model for every user: nothing a request did may reach the next."""
    lora, _ = lora_pair(remote_model, local_model)
    base = remote_base_logits(remote_model)
    assert torch.allclose(base, hf_logits(local_model, PROMPT), atol=1e-5)

    # after a request that used lora(), in a trace and in generation
    with remote_model.trace(PROMPT, remote=True):
        lora()
        adapted = remote_model.lm_head.output.save()
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.equal(remote_base_logits(remote_model), base)
    with remote_model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=True):
        lora()
    assert torch.equal(remote_base_logits(remote_model), base)

    # after a request that raised once lora() was on, from the user's code and from the forward
    with pytest.raises(RemoteError, match="the user's code failed"):
        with remote_model.trace(PROMPT, remote=True):
            lora()
            remote_model.model.layers[1].output.save()
            raise ValueError("the user's code failed")
    assert torch.equal(remote_base_logits(remote_model), base)
    wrong = LORA(remote_model.get(TARGET), r=4, output_dim=7)
    with pytest.raises(RemoteError, match=r"WB has shape \(4, 7\)"):
        with remote_model.trace(PROMPT, remote=True):
            wrong()
            remote_model.lm_head.output.save()
    with remote_model.trace(PROMPT, remote=True):
        logits = remote_model.lm_head.output.save()
        forward = nnsight.save(type(remote_model.get(TARGET)._module.__dict__["forward"]).__name__)
    assert torch.equal(logits, base)
    assert forward == "Controller"  # nnsight's own controller is back on the served module


def test_unregistered_package_fails_before_sending(remote_model, monkeypatch):
    import cloudpickle.cloudpickle

    lora = LORA(remote_model.get(TARGET), r=4)
    sent = []
    monkeypatch.setattr(RemoteBackend, "_post", lambda self, *args: sent.append(args))
    monkeypatch.setattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
    with pytest.raises(RuntimeError, match=r"^`LORA` cannot be sent .* Call `nnsight\.register\(nnsight_toolbox\)`"):
        with remote_model.trace(PROMPT, remote=True):
            lora()
            remote_model.lm_head.output.save()
    assert sent == []


def test_the_server_really_lacks_the_package(remote_model, monkeypatch):
    """Without the check and the registration, the server cannot rebuild a `LORA`: what the check prevents."""
    import cloudpickle.cloudpickle

    import nnsight_toolbox.optim.optimization as optimization

    lora = LORA(remote_model.get(TARGET), r=4)
    monkeypatch.setattr(optimization, "check_shippable", lambda obj: None)
    monkeypatch.setattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
    with pytest.raises(RemoteError, match="No module named 'nnsight_toolbox'"):
        with remote_model.trace(PROMPT, remote=True):
            lora()
            remote_model.lm_head.output.save()


def test_an_intervention_on_another_models_module_fails_before_sending(remote_model, model_paths, monkeypatch):
    """The served Llama has no `model.transformer.h.0.mlp`: said here, not by the server."""
    gpt2 = load(model_paths["gpt2"])
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    sent = []
    monkeypatch.setattr(RemoteBackend, "_post", lambda self, *args: sent.append(args))
    with pytest.raises(ValueError, match=r"^This `LORA` acts on `model.transformer.h.0.mlp` of another model .* has no module at"):
        with remote_model.trace(PROMPT, remote=True):
            lora()
            remote_model.lm_head.output.save()
    assert sent == []


def test_the_server_blames_package_versions_for_another_models_module(remote_model, model_paths, monkeypatch):
    """What the check above prevents: the server's answer, which points at package versions."""
    import nnsight_toolbox.remote

    monkeypatch.setattr(nnsight_toolbox.remote, "_check_module_belongs_to_traced_model", lambda obj: None)
    gpt2 = load(model_paths["gpt2"])
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    with pytest.raises(RemoteError, match="architecture on this server doesn't match"):
        with remote_model.trace(PROMPT, remote=True):
            lora()
            remote_model.lm_head.output.save()


def test_an_intervention_built_on_a_local_copy_of_the_served_model_is_sent(remote_model, local_model):
    """The same module class and shapes at the same path: the server applies it to its own module."""
    local_lora = LORA(local_model.get(TARGET), r=4)
    randomize(local_lora, scale=2.0)
    with remote_model.trace(PROMPT, remote=True):
        local_lora()
        logits = remote_model.lm_head.output.save()
    with local_model.trace(PROMPT):
        local_lora()
        local_logits = local_model.lm_head.output.save()
    assert torch.allclose(logits, local_logits, atol=1e-5)


def last_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[-1]


@pytest.mark.parametrize(
    "mistake, dims",
    [("an input that does not fit WA", {"input_dim": 7}), ("an adapter built for another module", {"output_dim": 7})],
)
def test_errors_from_the_server_say_what_went_wrong(remote_model, local_model, mistake, dims):
    """The `RemoteError` ends with the package's own message, word for word what the same mistake raises locally."""
    lora = LORA(remote_model.get(TARGET), r=4, **dims)
    local_lora = LORA(local_model.get(TARGET), r=4, **dims)
    with pytest.raises(ValueError) as local:
        with local_model.trace(PROMPT):
            local_lora()
            local_model.lm_head.output.save()
    with pytest.raises(RemoteError) as remote:
        with remote_model.trace(PROMPT, remote=True):
            lora()
            remote_model.lm_head.output.save()
    assert last_line(remote.value) == f"ValueError: {local.value}"
    assert "Was the adapter built for another module?" in last_line(remote.value)


def test_lora_outside_a_trace_in_a_remote_session(remote_model, local_model):
    lora = LORA(remote_model.get(TARGET), r=4)
    local_lora = LORA(local_model.get(TARGET), r=4)
    with pytest.raises(RuntimeError) as local:
        with local_model.session():
            local_lora()
    with pytest.raises(RemoteError) as remote:
        with remote_model.session(remote=True):
            lora()
    assert last_line(remote.value) == f"RuntimeError: {local.value}"
    assert "must be called inside `model.trace(...)`" in last_line(remote.value)
