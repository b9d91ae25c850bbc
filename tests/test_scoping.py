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


@pytest.mark.slow  # a loop of traces
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


# --- a deleted adapter is freed ------------------------------------------------------


def train_once(gpt2, path="transformer.h.0.mlp"):
    """Build an adapter, run it, backpropagate, and drop it: weak references to it and its gradient.

    A helper, as a notebook cell's code is: nnsight captures the locals of the
    frame a trace is written in, and a function's frame keeps a snapshot of
    them (``frame.f_locals``) that ``del`` does not update.
    """
    import weakref

    lora = LORA(gpt2.get(path), r=4)
    randomize(lora)
    with gpt2.trace(PROMPT):
        lora()
        logits = gpt2.lm_head.output.save()
    logits.sum().backward()
    return weakref.ref(lora), weakref.ref(lora.WB.grad)


@pytest.mark.slow
def test_a_deleted_adapter_and_its_gradients_are_freed_before_its_module_runs_again(gpt2):
    adapter, grad = train_once(gpt2)
    assert isinstance(installed_forward(gpt2.transformer.h[0].mlp), AdapterController)  # has not run since
    gc.collect()
    assert adapter() is None and grad() is None


@pytest.mark.slow  # a loop of traces
def test_building_and_dropping_adapters_in_a_loop_does_not_grow(gpt2):
    paths = ["transformer.h.0.mlp", "transformer.h.1.mlp", "transformer.h.0.attn.c_attn"]
    refs = [train_once(gpt2, paths[i % len(paths)]) for i in range(9)]
    gc.collect()
    assert [adapter() is None and grad() is None for adapter, grad in refs] == [True] * 9
    assert all(len(getattr(installed_forward(gpt2.get(path)), "activations", [])) <= 1 for path in paths)


@pytest.mark.slow
def test_an_adapter_nobody_else_holds_still_acts_for_its_whole_run(gpt2):
    """The run keeps an adapter alive: a temporary adapter must not vanish mid-generation."""
    from conftest import hf_generate, reference_hook

    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora, scale=2.0)
    WA, WB = lora.WA.detach().clone(), lora.WB.detach().clone()
    pending = [lora]
    del lora
    with gpt2.generate(PROMPT, max_new_tokens=4, do_sample=False) as tracer:
        pending.pop()()  # the only reference is this call's
        gc.collect()
        ids = tracer.result.save()
    with reference_hook(gpt2, "transformer.h.0.mlp", WA, WB):
        expected = hf_generate(gpt2, PROMPT, 4)
    assert torch.equal(ids, expected)
    assert not torch.equal(ids, hf_generate(gpt2, PROMPT, 4))
