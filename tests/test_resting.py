"""Resting (`nnsight_toolbox.optim.standby`): a module whose ``positions=`` are all prompt tokens
gets nnsight's own controller back once generation moves past the prompt; so does a module
whose ``steps=`` are all behind (`AdapterController.retire_if_idle`).

Each test compares the package with an independent hook (tests/position_reference.py
picks the columns) and checks which controller ran the module at each pass, so
that a test cannot pass without the resting path having run. The reference
reads each pass's first column from the root's own inputs (its attention mask's
width less its tokens), so it is right for a pass without the KV cache too.
"""

import contextlib

import pytest
import torch
from conftest import forwards_seen, randomize
from nnsight.intervention.source import Controller
from position_reference import EVERY, column_mask, left_padded, raw_generate

from nnsight_toolbox import LORA, SoftPrompt
from nnsight_toolbox.optim.activation import AdapterController

PROMPTS = ["The Eiffel Tower is in", "Hi", "Paris is the capital"]  # 22, 2 and 20 tokens
MLP = "transformer.h.0.mlp"
PROMPT_ONLY = [0, 1, -1]  # prompt tokens of every row: the module can rest after the prefill


def lora_on(gpt2, seed=0):
    lora = LORA(gpt2.get(MLP), r=4)
    randomize(lora, seed=seed, scale=2.0)
    return lora


def lora_formula(lora):
    WA, WB = lora.WA.detach(), lora.WB.detach()
    return lambda h, x: h + x @ WA @ WB


@contextlib.contextmanager
def hook_by_pass(gpt2, module, formula, attention_mask, specs_by_pass):
    """``formula`` at the columns ``specs_by_pass(pass_index)`` picks, each pass's first column read from the root's inputs."""
    seen = {"pass": -1}

    def root_pre_hook(mod, args, kwargs):
        seen["pass"] += 1
        seen["first"] = kwargs["attention_mask"].shape[1] - kwargs["input_ids"].shape[1]

    def hook(mod, args, output):
        mask = column_mask(attention_mask, specs_by_pass(seen["pass"]), seen["first"], output.shape[1])
        return torch.where(mask[..., None], formula(output, args[0]).to(output.dtype), output)

    handles = [gpt2._module.register_forward_pre_hook(root_pre_hook, with_kwargs=True), module.register_forward_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def cached_then_uncached(gpt2, logits):
    """``gpt2``'s model generates with 2 cached steps, then 1 pass over the whole sequence without the cache.

    Each pass's logits at its real tokens go to ``logits`` (a padding column's
    value is nobody's token, and `positions=None` adapts it). Nothing in ``generate`` does this; a
    model called this way is what a resting module must wake up for.
    """
    hf = gpt2._module

    def generate(input_ids, attention_mask, **ignored):
        cache = None
        ids, mask = input_ids, attention_mask
        for new in (ids, None, None):  # the prefill, then two cached steps
            out = hf(input_ids=ids[:, -1:] if new is None else new, attention_mask=mask, cache=cache, use_cache=True)
            logits.append(out.logits[mask[:, -out.logits.shape[1] :].bool()])
            cache = out.past_key_values
            ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = hf(input_ids=ids, attention_mask=mask, use_cache=False)  # the prompt's columns again
        logits.append(out.logits[mask.bool()])
        return torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)

    hf.generate = generate
    try:
        yield
    finally:
        del hf.generate


def generate_both_ways(gpt2, lora, positions, new_tokens=5):
    """The package's greedy tokens with ``positions=``, the forward that ran the MLP at each pass, and the hook's tokens."""
    batch = left_padded(gpt2, PROMPTS)
    module = gpt2._module.get_submodule(MLP)
    with forwards_seen(module) as kinds, gpt2.generate(PROMPTS, max_new_tokens=new_tokens, do_sample=False) as tracer:
        lora(positions=positions)
        ids = tracer.result.save()
    with torch.no_grad(), hook_by_pass(gpt2, module, lora_formula(lora), batch["attention_mask"], lambda p: [positions] * 3):
        expected = raw_generate(gpt2, batch, new_tokens)
    assert not torch.equal(expected, raw_generate(gpt2, batch, new_tokens)), "the adapter should change the text"
    return kinds, ids, expected


@pytest.mark.slow  # a generate loop
def test_a_generation_step_past_the_prompt_runs_nnsights_own_controller(gpt2):
    """The point of resting: after the prefill, the module costs what nnsight costs; the tokens still equal the hook's."""
    kinds, ids, expected = generate_both_ways(gpt2, lora_on(gpt2, seed=3), PROMPT_ONLY)
    assert kinds == ["package"] + ["nnsight"] * 4
    forward = gpt2._module.get_submodule(MLP).__dict__["forward"]
    assert isinstance(forward, Controller) and not isinstance(forward, AdapterController)
    assert torch.equal(ids, expected)


@pytest.mark.slow  # a generate loop
def test_a_position_past_some_rows_prompt_keeps_the_module_awake(gpt2):
    """Position 3 of "Hi" (2 tokens) is its second generated token: the module must not rest."""
    kinds, ids, expected = generate_both_ways(gpt2, lora_on(gpt2, seed=3), [0, 3])
    assert kinds == ["package"] * 5
    assert torch.equal(ids, expected)


def test_without_the_cache_every_pass_holds_the_prompt_and_nothing_rests(gpt2):
    """A soft prompt in ``generate(use_cache=False)``: every pass replaces the placeholders again, as its hook does."""
    soft = SoftPrompt(gpt2.transformer.wte, 3)
    with torch.no_grad():
        soft.embeddings.copy_(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)))
    prompts = ["###" + p for p in PROMPTS]
    batch = left_padded(gpt2, prompts)
    lengths = batch["attention_mask"].sum(1).tolist()
    vectors = soft.embeddings.detach()
    module = gpt2._module.transformer.wte

    def soft_formula(h, x):  # vector k at real token k of each row (left padding)
        new = h.clone()
        for b, length in enumerate(lengths):
            pad = batch["attention_mask"].shape[1] - length
            new[b, pad : pad + 3] = vectors
        return new

    with forwards_seen(module) as kinds, gpt2.generate(prompts, max_new_tokens=4, do_sample=False, use_cache=False) as tracer:
        soft()
        ids = tracer.result.save()
    assert kinds == ["package"] * 4
    with torch.no_grad(), hook_by_pass(gpt2, module, soft_formula, batch["attention_mask"], lambda p: [[0, 1, 2]] * 3):
        expected = gpt2._module.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=gpt2.tokenizer.eos_token_id)
    assert not torch.equal(expected, raw_generate(gpt2, batch, 4)), "the soft prompt should change the text"
    assert torch.equal(ids, expected)


def package_cached_then_uncached(gpt2, switch_on):
    """Each pass's logits (`cached_then_uncached`), the forward that ran the MLP at each pass, and the ids; ``switch_on(tracer)`` inside the run."""
    ours = []
    with cached_then_uncached(gpt2, ours), forwards_seen(gpt2._module.get_submodule(MLP)) as kinds:
        with gpt2.generate(PROMPTS) as tracer:
            switch_on(tracer)
            ids = tracer.result.save()
    return ours, kinds, ids


def hooks_cached_then_uncached(gpt2, hooks):
    """The same passes with ``hooks``, ``[(lora, specs_by_pass), ...]``, as plain hooks on the MLP: each pass's logits and the ids."""
    batch = left_padded(gpt2, PROMPTS)
    module = gpt2._module.get_submodule(MLP)
    logits = []
    with cached_then_uncached(gpt2, logits), torch.no_grad(), contextlib.ExitStack() as stack:
        for lora, specs_by_pass in hooks:
            stack.enter_context(hook_by_pass(gpt2, module, lora_formula(lora), batch["attention_mask"], specs_by_pass))
        ids = gpt2._module.generate(**batch)
    return logits, ids


def assert_same_passes(ours, ids, expected, expected_ids):
    assert torch.equal(ids, expected_ids)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_a_pass_that_holds_the_prompt_again_wakes_the_module(gpt2):
    """Rested at the cached steps, woken for a pass over the whole sequence: every pass's logits equal the hook's."""
    lora = lora_on(gpt2, seed=3)
    ours, kinds, ids = package_cached_then_uncached(gpt2, lambda tracer: lora(positions=PROMPT_ONLY))
    assert kinds == ["package", "nnsight", "nnsight", "package"]
    expected, expected_ids = hooks_cached_then_uncached(gpt2, [(lora, lambda p: [PROMPT_ONLY] * 3)])
    unadapted, _ = hooks_cached_then_uncached(gpt2, [])
    assert not torch.allclose(expected[3], unadapted[3]), "the adapter should change the pass that holds the prompt again"
    assert_same_passes(ours, ids, expected, expected_ids)


def test_a_switch_on_while_resting_brings_the_resting_interventions_back_with_it(gpt2):
    """A second LoRA on the same module from pass 2 on, every token: both act at pass 3, which holds the prompt again."""
    first, second = lora_on(gpt2, seed=3), lora_on(gpt2, seed=4)

    def switch_on(tracer):
        first(positions=PROMPT_ONLY)
        for step in tracer.iter[1:3]:
            if step == 2:  # at the end of pass 1 (its output), while the module rests: acts from pass 2
                with pytest.warns(UserWarning, match="acts from the next one"):
                    second()
            _ = gpt2.output  # waits for the end of this pass

    ours, kinds, ids = package_cached_then_uncached(gpt2, switch_on)
    assert kinds == ["package", "nnsight", "package", "package"]
    second_picks = lambda p: [EVERY] * 3 if p >= 2 else [None] * 3  # noqa: E731
    expected, expected_ids = hooks_cached_then_uncached(gpt2, [(first, lambda p: [PROMPT_ONLY] * 3), (second, second_picks)])
    assert_same_passes(ours, ids, expected, expected_ids)


def test_a_position_a_row_lacks_is_still_an_error_when_switched_on_after_the_prefill(gpt2):
    """"Hi" has 2 tokens, so it has no position -5: the module must stay awake to say so at the next pass."""
    first, late = lora_on(gpt2, seed=3), lora_on(gpt2, seed=4)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of this invoke have no such position"):
        with gpt2.generate(PROMPTS, max_new_tokens=4, do_sample=False) as tracer:
            first(positions=PROMPT_ONLY)
            for step in tracer.iter[0:2]:
                if step == 1:  # at the end of the prefill
                    with pytest.warns(UserWarning, match="acts from the next one"):
                        late(positions=-5)
                _ = gpt2.output  # waits for the end of this pass


# ---------------------------------------------------------------------------
# `steps=`: past an intervention's last chosen pass, its module gets nnsight's controller back
# ---------------------------------------------------------------------------


def steps_both_ways(gpt2, switch_on, hooks, new_tokens):
    """The package's greedy tokens (``switch_on(tracer)`` in the run) and the forward that ran the MLP at each pass;
    the tokens of ``hooks``, ``[(lora, passes), ...]``, as plain hooks acting on every token of the chosen passes."""
    batch = left_padded(gpt2, PROMPTS)
    module = gpt2._module.get_submodule(MLP)
    with forwards_seen(module) as kinds, gpt2.generate(PROMPTS, max_new_tokens=new_tokens, do_sample=False) as tracer:
        switch_on(tracer)
        ids = tracer.result.save()
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for lora, passes in hooks:
            picks = lambda p, passes=passes: [EVERY if p in passes else None] * 3  # noqa: E731
            stack.enter_context(hook_by_pass(gpt2, module, lora_formula(lora), batch["attention_mask"], picks))
        expected = raw_generate(gpt2, batch, new_tokens)
    assert not torch.equal(expected, raw_generate(gpt2, batch, new_tokens)), "the adapter should change the text"
    return kinds, ids, expected


@pytest.mark.slow  # a generate loop
def test_after_its_last_step_the_module_runs_nnsights_own_controller(gpt2):
    """``steps=0``: the prefill only. Pass 1 finds the step behind and retires the package's controller."""
    lora = lora_on(gpt2, seed=3)
    kinds, ids, expected = steps_both_ways(gpt2, lambda tracer: lora(steps=0), [(lora, {0})], new_tokens=5)
    assert kinds == ["package", "package"] + ["nnsight"] * 3
    forward = gpt2._module.get_submodule(MLP).__dict__["forward"]
    assert isinstance(forward, Controller) and not isinstance(forward, AdapterController)
    assert torch.equal(ids, expected)


@pytest.mark.slow
def test_a_pass_between_chosen_steps_keeps_the_controller(gpt2):
    """``steps={1, 3}``: pass 2 acts on nothing but pass 3 still does, so only pass 4 retires it."""
    lora = lora_on(gpt2, seed=3)
    kinds, ids, expected = steps_both_ways(gpt2, lambda tracer: lora(steps={1, 3}), [(lora, {1, 3})], new_tokens=7)
    assert kinds == ["package"] * 5 + ["nnsight"] * 2
    assert torch.equal(ids, expected)


@pytest.mark.slow
def test_a_switch_on_after_the_controller_retired_installs_it_again(gpt2):
    """``steps=0``, then the same LoRA again at the end of pass 2 with ``steps=3``: it acts at passes 0 and 3."""
    lora = lora_on(gpt2, seed=3)

    def switch_on(tracer):
        lora(steps=0)
        for step in tracer.iter[2:4]:
            if step == 3:  # at the end of pass 2 (its output); the controller retired at pass 1
                with pytest.warns(UserWarning, match="acts from the next one"):
                    lora(steps=3)
            _ = gpt2.output  # waits for the end of this pass

    kinds, ids, expected = steps_both_ways(gpt2, switch_on, [(lora, {0, 3})], new_tokens=6)
    assert kinds == ["package", "package", "nnsight", "package", "package", "nnsight"]
    assert torch.equal(ids, expected)
