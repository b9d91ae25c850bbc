"""Nothing leaks: after a run, and after a run that raised, the model is the base model."""

import gc

import pytest
import torch
from conftest import hf_logits, randomize
from nnsight.intervention.source import Controller

from nnsight_toolbox import LORA
from nnsight_toolbox.optim.activation import AdapterController

PROMPT = "The Eiffel Tower is in"


def installed_forward(envoy):
    return envoy._module.__dict__["forward"]


def test_after_a_run_the_model_is_the_base_model(gpt2):
    base = hf_logits(gpt2, PROMPT)
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    with gpt2.trace(PROMPT):
        lora()
    assert torch.equal(hf_logits(gpt2, PROMPT), base)
    with gpt2.trace(PROMPT):
        logits = gpt2.lm_head.output.save()
    assert torch.equal(logits, base)
    forward = installed_forward(gpt2.transformer.h[0].mlp)
    assert type(forward) is Controller, "nnsight's own controller is back"


@pytest.mark.parametrize("where", ["user code", "model forward"])
def test_after_a_run_that_raised_the_model_is_the_base_model(gpt2, where):
    base = hf_logits(gpt2, PROMPT)
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    with pytest.raises((RuntimeError, ValueError)):
        with gpt2.trace(PROMPT):
            lora()
            if where == "user code":
                gpt2.transformer.h[1].output.save()
                raise RuntimeError("user error mid-run")
            gpt2.transformer.h[0].mlp.c_proj.input = torch.zeros(1, 1, 7)  # wrong shape: the model raises
    with gpt2.trace(PROMPT):
        logits = gpt2.lm_head.output.save()
    assert torch.equal(logits, base)
    assert torch.equal(hf_logits(gpt2, PROMPT), base)


def test_a_later_trace_without_the_call_is_not_adapted(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    with gpt2.trace(PROMPT):
        lora()
        adapted = gpt2.lm_head.output.save()
    with gpt2.trace(PROMPT):
        plain = gpt2.lm_head.output.save()
    assert not torch.allclose(adapted, plain)
    assert torch.equal(plain, hf_logits(gpt2, PROMPT))


def test_many_traces_do_not_accumulate_state(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    for _ in range(30):
        with gpt2.trace(PROMPT):
            lora()
            gpt2.lm_head.output.save()
        forward = installed_forward(gpt2.transformer.h[0].mlp)
        if isinstance(forward, AdapterController):
            assert len(forward.activations) <= 1
    gc.collect()


def test_a_session_of_traces_scopes_each_trace(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    with gpt2.session():
        with gpt2.trace(PROMPT):
            lora()
            adapted = gpt2.lm_head.output.save()
        with gpt2.trace(PROMPT):
            plain = gpt2.lm_head.output.save()
    assert not torch.allclose(adapted, plain)
    assert torch.equal(plain, hf_logits(gpt2, PROMPT))
