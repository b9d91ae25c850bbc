"""`lora()` inside `model.generate`: every step, per invoke, code after it runs."""

import pytest
import torch
from conftest import TARGETS, assert_row_generated, envoy_at, hf_generate, randomize, reference_hook

from nnsight_toolbox import LORA

PROMPT = "The Eiffel Tower is in"
NEW = 8


def adapted(model, family, seed=0):
    lora = LORA(envoy_at(model, TARGETS[family]["mlp"]), r=4)
    randomize(lora, seed=seed, scale=2.0)
    return lora


def reference(model, family, lora, prompt, alpha=1.0):
    with reference_hook(model, TARGETS[family]["mlp"], lora.WA.detach(), lora.WB.detach(), alpha=alpha):
        return hf_generate(model, prompt, NEW)


def test_greedy_generation_equals_the_reference_token_for_token(model, family):
    lora = adapted(model, family)
    with model.generate(PROMPT, max_new_tokens=NEW, do_sample=False) as tracer:
        lora()
        ids = tracer.result.save()
    expected = reference(model, family, lora, PROMPT)
    assert not torch.equal(expected, hf_generate(model, PROMPT, NEW)), "the adapter should change the text"
    assert torch.equal(ids, expected)


@pytest.mark.slow  # generate loops
def test_only_the_invoke_that_called_it_is_adapted(model, family):
    lora = adapted(model, family)
    prompts = [PROMPT, PROMPT[::-1]]
    with model.generate(max_new_tokens=NEW, do_sample=False) as tracer:
        with tracer.invoke(prompts[0]):
            lora()
        with tracer.invoke(prompts[1]):
            pass
        with tracer.invoke():
            ids = tracer.result.save()
    assert_row_generated(ids[0], reference(model, family, lora, prompts[0])[0], model)
    assert_row_generated(ids[1], hf_generate(model, prompts[1], NEW)[0], model)


@pytest.mark.slow  # generate loops
def test_each_invoke_can_carry_its_own_adapter(model, family):
    first, second = adapted(model, family, seed=1), adapted(model, family, seed=2)
    prompts = [PROMPT, PROMPT.upper()]
    with model.generate(max_new_tokens=NEW, do_sample=False) as tracer:
        with tracer.invoke(prompts[0]):
            first()
        with tracer.invoke(prompts[1]):
            second(alpha=0.5)
        with tracer.invoke():
            ids = tracer.result.save()
    assert_row_generated(ids[0], reference(model, family, first, prompts[0])[0], model)
    assert_row_generated(ids[1], reference(model, family, second, prompts[1], alpha=0.5)[0], model)


@pytest.mark.slow
def test_an_empty_invoke_adapts_the_whole_batch(gpt2):
    lora = adapted(gpt2, "gpt2")
    prompts = [PROMPT, PROMPT.upper()]
    with gpt2.generate(max_new_tokens=NEW, do_sample=False) as tracer:
        with tracer.invoke(prompts[0]):
            pass
        with tracer.invoke(prompts[1]):
            pass
        with tracer.invoke():
            lora()
            ids = tracer.result.save()
    for row, prompt in enumerate(prompts):
        assert_row_generated(ids[row], reference(gpt2, "gpt2", lora, prompt)[0], gpt2)


def test_one_adapter_twice_on_the_same_rows_is_refused(gpt2):
    lora = adapted(gpt2, "gpt2")
    with pytest.raises(RuntimeError, match="at most once per row"):
        with gpt2.generate(max_new_tokens=2, do_sample=False) as tracer:
            with tracer.invoke(PROMPT):
                lora()
            with tracer.invoke(PROMPT.upper()):
                pass
            with tracer.invoke():
                lora()


@pytest.mark.slow
def test_code_after_the_call_runs_at_every_step(gpt2):
    lora = adapted(gpt2, "gpt2")
    with gpt2.generate(PROMPT, max_new_tokens=NEW, do_sample=False) as tracer:
        lora()
        hidden = list().save()
        for step in tracer.iter[:NEW]:
            hidden.append(gpt2.transformer.h[1].output[:, -1])
        ids = tracer.result.save()  # after the loop: runs because the bounded loop ends
    assert len(hidden) == NEW
    assert torch.equal(ids, reference(gpt2, "gpt2", lora, PROMPT))


@pytest.mark.slow
def test_calling_it_at_every_step_does_not_apply_it_twice(gpt2):
    lora = adapted(gpt2, "gpt2")
    with gpt2.generate(PROMPT, max_new_tokens=NEW, do_sample=False) as tracer:
        outputs = list().save()
        for step in tracer.iter[:NEW]:
            lora()
            outputs.append(gpt2.transformer.h[0].mlp.output)
        ids = tracer.result.save()
    assert torch.equal(ids, reference(gpt2, "gpt2", lora, PROMPT))
    with gpt2.generate(PROMPT, max_new_tokens=NEW, do_sample=False) as tracer:
        lora()
        once = list().save()
        for step in tracer.iter[:NEW]:
            once.append(gpt2.transformer.h[0].mlp.output)
    for twice, single in zip(outputs, once):
        torch.testing.assert_close(twice, single)


def generate_adapting_passes(gpt2, lora, chosen):
    """Reference: HF generate with a hook that adds the delta on the chosen forward passes."""
    passes = []
    counter = gpt2._module.register_forward_pre_hook(lambda m, a: passes.append(None))
    WA, WB = lora.WA.detach(), lora.WB.detach()
    mlp = gpt2._module.transformer.h[0].mlp
    hook = mlp.register_forward_hook(lambda m, i, o: o + i[0] @ WA @ WB if len(passes) - 1 in chosen else o)
    try:
        return hf_generate(gpt2, PROMPT, NEW)
    finally:
        counter.remove()
        hook.remove()


def test_steps_restrict_it_to_chosen_forward_passes(gpt2):
    lora = adapted(gpt2, "gpt2")
    chosen = {1, 3, 4}
    with gpt2.generate(PROMPT, max_new_tokens=NEW, do_sample=False) as tracer:
        lora(steps=chosen)
        ids = tracer.result.save()
    assert torch.equal(ids, generate_adapting_passes(gpt2, lora, chosen))
    assert not torch.equal(ids, reference(gpt2, "gpt2", lora, PROMPT))


@pytest.mark.parametrize(
    "steps",
    [-1, "all", 1.5, [0, -2], slice(0, 5, 0), slice(None, None, -1), slice(0, 5, 1.5), slice("a", None)],
    ids=repr,
)
def test_bad_steps_are_refused(gpt2, steps):
    lora = adapted(gpt2, "gpt2")
    with pytest.raises(ValueError, match="`steps`"):
        with gpt2.trace(PROMPT):
            lora(steps=steps)


@pytest.mark.slow
def test_a_call_after_the_module_ran_warns_and_acts_from_the_next_step(gpt2):
    lora = adapted(gpt2, "gpt2")
    with pytest.warns(UserWarning, match="had already run in this forward pass"):
        with gpt2.generate(PROMPT, max_new_tokens=NEW, do_sample=False) as tracer:
            gpt2.transformer.h[1].output.save()  # the prefill is past the adapted module
            lora()
            ids = tracer.result.save()
    assert torch.equal(ids, generate_adapting_passes(gpt2, lora, range(1, NEW)))
