"""``positions=`` against an independent hook (tests/position_reference.py).

Left-padded batches of different prompt lengths; int, list and slice positions
(pyreft's "f2+l2" ``[0, 1, -2, -1]`` and ``slice(-1, None)``); trace logits
at every real position, gradients, greedy generation with the KV cache, and
two invokes with different positions. The adapter is a `LORA` on an MLP block;
the other interventions are checked the same way in test_interventions.py.
"""

import pytest
import torch
from conftest import randomize
from position_reference import EVERY, left_padded, positioned_hook, raw_generate, raw_logits

from nnsight_toolbox import LORA

PROMPTS = ["The Eiffel Tower is in", "Hi", "Paris is the capital"]  # 22, 2 and 20 tokens
MLP = "transformer.h.0.mlp"
SPECS = [0, -1, [0, 1, -2, -1], slice(1, 3), slice(-1, None), slice(None, None, 2), slice(0, -1)]


def lora_on(gpt2, seed=0):
    lora = LORA(gpt2.get(MLP), r=4)
    randomize(lora, seed=seed, scale=2.0)
    return lora


def lora_formula(lora, WA=None, WB=None):
    WA = lora.WA.detach() if WA is None else WA
    WB = lora.WB.detach() if WB is None else WB
    return lambda h, x: h + x @ WA @ WB


def trace(gpt2, lora, prompts, positions):
    with gpt2.trace(prompts):
        lora(positions=positions)
        logits = gpt2.lm_head.output.save()
    return logits


def test_the_reference_batch_is_the_one_nnsight_runs(gpt2):
    """Without any adapter, nnsight's logits are the raw model's on every real token."""
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.trace(PROMPTS):
        ours = gpt2.lm_head.output.save()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(ours[real], raw_logits(gpt2, batch)[real])


@pytest.mark.slow  # a sweep of specs
@pytest.mark.parametrize("positions", SPECS, ids=repr)
def test_trace_logits_equal_the_hook_at_every_real_position(gpt2, positions):
    lora = lora_on(gpt2)
    batch = left_padded(gpt2, PROMPTS)
    ours = trace(gpt2, lora, PROMPTS, positions)
    specs = [positions] * len(PROMPTS)
    with torch.no_grad(), positioned_hook(gpt2._module.get_submodule(MLP), lora_formula(lora), batch["attention_mask"], specs):
        expected = raw_logits(gpt2, batch)
    with torch.no_grad():
        everywhere = trace(gpt2, lora, PROMPTS, None)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[real])
    assert not torch.allclose(ours[real], everywhere[real]), "a choice of positions should differ from every position"


@pytest.mark.slow  # seconds
@pytest.mark.parametrize("positions", [[0, 1, -2, -1], slice(-1, None)], ids=repr)
def test_gradients_equal_the_hook(gpt2, positions):
    lora = lora_on(gpt2)
    batch = left_padded(gpt2, PROMPTS)
    real = batch["attention_mask"].bool()
    weights = torch.randn(int(real.sum()), gpt2._module.config.vocab_size, generator=torch.Generator().manual_seed(0))
    (trace(gpt2, lora, PROMPTS, positions)[real] * weights).sum().backward()

    WA, WB = lora.WA.detach().clone().requires_grad_(), lora.WB.detach().clone().requires_grad_()
    with positioned_hook(gpt2._module.get_submodule(MLP), lora_formula(lora, WA, WB), batch["attention_mask"], [positions] * 3):
        (raw_logits(gpt2, batch)[real] * weights).sum().backward()
    torch.testing.assert_close(lora.WA.grad, WA.grad)
    torch.testing.assert_close(lora.WB.grad, WB.grad)


@pytest.mark.slow  # a generate loop per case
@pytest.mark.parametrize("positions", [None, [0, 1, -2, -1], slice(-1, None), -1, slice(-1, None, 2), [0, 3]], ids=repr)
def test_greedy_generation_with_the_cache_equals_the_hook(gpt2, positions):
    """``[0, 3]``: the row "Hi" (2 tokens) is adapted at its first token and its second generated one."""
    lora = lora_on(gpt2, seed=3)
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.generate(PROMPTS, max_new_tokens=6, do_sample=False) as tracer:
        lora(positions=positions)
        ids = tracer.result.save()
    spec = EVERY if positions is None else positions
    with torch.no_grad(), positioned_hook(gpt2._module.get_submodule(MLP), lora_formula(lora), batch["attention_mask"], [spec] * 3):
        expected = raw_generate(gpt2, batch, 6)
    assert not torch.equal(expected, raw_generate(gpt2, batch, 6)), "the adapter should change the text"
    assert torch.equal(ids, expected)


@pytest.mark.slow
@pytest.mark.parametrize("first, last", [(None, -1), (-1, None)], ids=["every token, then the last", "the last, then every token"])
def test_a_repeat_call_in_the_same_invoke_replaces_the_positions(gpt2, first, last):
    """The invoke's last call wins, both ways: a call with `positions=` narrows a plain one, and a plain one widens it."""
    lora = lora_on(gpt2)
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.trace(PROMPTS):
        lora(positions=first)
        lora(positions=last)
        ours = gpt2.lm_head.output.save()
    spec = EVERY if last is None else last
    with torch.no_grad(), positioned_hook(gpt2._module.get_submodule(MLP), lora_formula(lora), batch["attention_mask"], [spec] * 3):
        expected = raw_logits(gpt2, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[real])


def test_two_invokes_with_different_positions(gpt2):
    """Rows 0-1 (one invoke) at the first token, row 2 (another) at the last two; per row, in one batch."""
    lora = lora_on(gpt2)
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.trace() as tracer:
        with tracer.invoke(PROMPTS[:2]):
            lora(positions=0)
        with tracer.invoke(PROMPTS[2:]):
            lora(positions=slice(-2, None))
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    specs = [0, 0, slice(-2, None)]
    with torch.no_grad(), positioned_hook(gpt2._module.get_submodule(MLP), lora_formula(lora), batch["attention_mask"], specs):
        expected = raw_logits(gpt2, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real])


def test_two_invokes_in_generation_one_with_positions_one_without_adapter(gpt2):
    lora = lora_on(gpt2, seed=3)
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.generate(max_new_tokens=5, do_sample=False) as tracer:
        with tracer.invoke(PROMPTS[:2]):
            lora(positions=slice(-1, None))
        with tracer.invoke(PROMPTS[2:]):
            pass
        with tracer.invoke():
            ids = tracer.result.save()
    specs = [slice(-1, None), slice(-1, None), None]
    with torch.no_grad(), positioned_hook(gpt2._module.get_submodule(MLP), lora_formula(lora), batch["attention_mask"], specs):
        expected = raw_generate(gpt2, batch, 5)
    assert torch.equal(ids, expected)


def test_a_position_a_row_lacks_is_an_error_naming_the_rows(gpt2):
    lora = lora_on(gpt2)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of this invoke have no such position \(their prompts have \[2\] real tokens"):
        trace(gpt2, lora, PROMPTS, [0, 5])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        trace(gpt2, lora, PROMPTS, -3)


@pytest.mark.parametrize("spec", [*SPECS, slice(2, None, 3), slice(None, 4), [-1, 3], 7, slice(-3, -1)])
def test_plain_python_picks_the_tokens_the_tensor_mask_picks(spec):
    """`python_mask`/`python_columns` (plain Python, small passes) against `position_mask`/`column_positions` (torch)."""
    from nnsight_toolbox.optim.positions import column_positions, normalize_positions, position_mask, python_columns, python_mask

    generator = torch.Generator().manual_seed(0)
    chosen = normalize_positions(spec)
    served = 0
    for trial in range(40):
        rows, width = int(torch.randint(1, 5, (1,), generator=generator)), int(torch.randint(2, 9, (1,), generator=generator))
        lengths = torch.randint(1, width + 1, (rows,), generator=generator)
        left_padded = trial % 4 != 0
        if left_padded:  # each row's real tokens are its last `length` columns
            mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        else:  # holes anywhere: only generated columns follow from the lengths
            mask = (torch.rand(rows, width, generator=generator) < 0.6).long()
            mask[:, -1] = 1
        lengths = mask.sum(1).tolist()
        for generating in (True, False):
            passes = [(0, width), (width - 1, 1)] + ([(start, w) for start in range(width, width + 5) for w in (1, 2)] if generating else [])
            for start, pass_width in passes:
                picked = python_mask(chosen, lengths, width, start, pass_width, generating, left_padded)
                if start < width and not left_padded:
                    assert picked is None  # prompt columns with holes are the torch path's
                    continue
                assert python_columns(lengths, width, start, pass_width) == column_positions(mask, start, pass_width).tolist()
                try:
                    expected = position_mask(chosen, mask, start, pass_width, generating, "m").tolist()
                except ValueError:
                    assert picked is None, (spec, mask.tolist(), start)  # the torch path raises the error naming the rows
                    continue
                assert picked == expected, (spec, mask.tolist(), start, generating)
                served += 1
    assert served > 100
