"""Never a silent no-op, never a silent wrong token.

Each case of an intervention that could not act, or could act on the wrong
tokens, rows or calls: where the package refuses, the test checks the error's
type and the words that tell the user what to do; where it acts, it checks the
result against a plain torch hook on the right tokens, rows or calls.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from nnsight import NNsight

from nnsight_toolbox import LORA, BatchedNNsight, LoReFT, PromptPositions, SteeringVector

PROMPT = torch.tensor([[5, 17, 23, 42, 8, 99, 3, 61, 7, 12]])  # 10 tokens


def steering(module, seed=0, **widths):
    vector = SteeringVector(module, **widths)
    with torch.no_grad():
        vector.v.copy_(torch.randn(vector.v.shape, generator=torch.Generator().manual_seed(seed)))
    return vector


def nonzero_lora(module, r=4, seed=0):
    lora = LORA(module, r=r)
    with torch.no_grad():
        lora.WB.copy_(torch.randn(lora.WB.shape, generator=torch.Generator().manual_seed(seed)))
    return lora


# ---------------------------------------------------------------------------
# 1. A module that never runs
# ---------------------------------------------------------------------------


class TwoBranches(torch.nn.Module):
    """A model whose forward calls ``used`` and never ``unused``."""

    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("kind", ["lora", "steer"])
def test_an_intervention_on_a_module_the_forward_never_calls_raises_at_the_end_of_the_run(kind):
    torch.manual_seed(0)
    model = NNsight(TwoBranches())
    intervention = LORA(model.unused, r=2) if kind == "lora" else SteeringVector(model.unused)
    with pytest.raises(RuntimeError, match=r"never acted: the run ended without calling `model.unused`") as error:
        with model.trace(torch.randn(2, 8)):
            intervention()
            model.output.save()
    assert "Put the intervention on a module the forward calls" in str(error.value)


def test_a_set_that_acted_may_hold_members_whose_module_never_ran_and_one_that_did_not_raises():
    """As a set on every expert of an MoE layer meets experts no token reached: the set acted."""
    from nnsight_toolbox import InterventionSet

    torch.manual_seed(0)
    model = NNsight(TwoBranches())
    used = nonzero_lora(model.used, r=2)
    both = InterventionSet([used, LORA(model.unused, r=2)])
    x = torch.randn(2, 8)
    with model.trace(x):
        both()
        got = model.output.save()
    torch.testing.assert_close(got.detach(), model._module.used(x) + x @ used.WA.detach() @ used.WB.detach())
    neither = InterventionSet([LORA(model.unused, r=2), SteeringVector(model.unused)])
    with pytest.raises(RuntimeError, match=r"These interventions acted on nothing in this run:\n- `interventions\(\)` on `model.unused`"):
        with model.trace(x):
            neither()


def test_a_container_is_refused_with_the_layer_to_pick_instead(gpt2):
    for build in (lambda: SteeringVector(gpt2.transformer.h), lambda: SteeringVector(gpt2.transformer.h, output_dim=32), lambda: LORA(gpt2.transformer.h, r=2)):
        with pytest.raises(TypeError, match=r"ModuleList, which the model's forward never calls.*`model.transformer.h\[0\]`"):
            build()


def test_an_intervention_switched_on_after_its_module_ran_raises_at_the_end_of_the_trace(gpt2):
    vector = steering(gpt2.transformer.h[0])
    with pytest.raises(RuntimeError, match=r"switched on after `model.transformer.h.0` had run"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the warning at the call; the error at the end is the point here
            with gpt2.trace(PROMPT):
                gpt2.transformer.h[1].output.save()
                vector()


def test_a_run_stopped_early_is_not_checked(gpt2):
    late = steering(gpt2.lm_head)
    with gpt2.trace(PROMPT) as tracer:
        late()
        hidden = gpt2.transformer.h[0].output.save()
        tracer.stop()
    assert hidden.shape[:2] == (1, 10)


def hooked_steps(gpt2, module, add, steps=3, prompt=PROMPT):
    """Each pass's last-token logits of ``generate`` with a plain torch hook that adds ``add(pass_index, hidden)``."""
    seen = []

    def hook(_, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + add(len(seen), hidden)
        seen.append(1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = module._module.register_forward_hook(hook)
    try:
        logits = []
        with gpt2.generate(prompt, max_new_tokens=steps) as tracer:
            for _ in tracer.iter[:steps]:
                logits.append(gpt2.lm_head.output[:, -1])
    finally:
        handle.remove()
    return logits


def test_an_intervention_that_acted_on_some_pass_does_not_raise(gpt2):
    """`steps=1` with two passes acts on the second only, as a hook on that pass does, and the run ends quietly."""
    vector = steering(gpt2.transformer.h[0])
    logits = []
    with gpt2.generate(PROMPT, max_new_tokens=2) as tracer:
        vector(steps=1)
        for _ in tracer.iter[:2]:
            logits.append(gpt2.lm_head.output[:, -1])
    expected = hooked_steps(gpt2, gpt2.transformer.h[0], lambda step, h: vector.v.detach() if step == 1 else torch.zeros(()), steps=2)
    torch.testing.assert_close(logits[0], expected[0])
    torch.testing.assert_close(logits[1], expected[1])
    unsteered = hooked_steps(gpt2, gpt2.transformer.h[0], lambda step, h: torch.zeros(()), steps=2)
    assert not torch.allclose(logits[1], unsteered[1])  # the second pass was steered


# ---------------------------------------------------------------------------
# 2. Positions or steps never reached in generate
# ---------------------------------------------------------------------------


def test_positions_past_every_row_in_generate_raise_with_what_was_asked_and_had(gpt2):
    vector = steering(gpt2.transformer.h[0])
    with pytest.raises(RuntimeError) as error:
        with gpt2.generate(PROMPT, max_new_tokens=2):
            vector(positions=30)
    message = str(error.value)
    assert "`steer()` on `model.transformer.h.0` never acted" in message
    assert "`positions=30`" in message and "[10] real prompt tokens" in message and "up to [10]" in message
    assert "generate more tokens" in message


def test_steps_past_the_last_pass_in_generate_raise(gpt2):
    vector = steering(gpt2.transformer.h[0])
    with pytest.raises(RuntimeError, match=r"`steps=5`.*2 forward pass\(es\)"):
        with gpt2.generate(PROMPT, max_new_tokens=2):
            vector(steps=5)


def test_a_position_reached_by_a_generated_token_acts_and_matches_a_hook(gpt2):
    """Position 10 is the first generated token: it passes through the model in step 1."""
    vector = steering(gpt2.transformer.h[0])
    steps = []
    with gpt2.generate(PROMPT, max_new_tokens=3) as tracer:
        vector(positions=10)
        for _ in tracer.iter[:3]:
            steps.append(gpt2.lm_head.output[:, -1])
    seen = []

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if len(seen) == 1:  # the pass of position 10 (with a KV cache, one token)
            hidden = hidden + vector.v
        seen.append(1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = gpt2.transformer.h[0]._module.register_forward_hook(hook)
    try:
        expected = []
        with gpt2.generate(PROMPT, max_new_tokens=3) as tracer:
            for _ in tracer.iter[:3]:
                expected.append(gpt2.lm_head.output[:, -1])
    finally:
        handle.remove()
    assert len(steps) == len(expected) == 3
    for got, want in zip(steps, expected):
        torch.testing.assert_close(got, want)


def test_a_second_row_that_reaches_a_position_is_enough(gpt2):
    """One row's prompt lacks position 7 and the run ends before a generated token reaches it; the other row has it."""
    vector = steering(gpt2.transformer.h[0])
    prompts = ["abcdefghij", "abcde"]
    with gpt2.generate(prompts, max_new_tokens=1):
        vector(positions=7)
        logits = gpt2.lm_head.output.save()  # the prefill, the only pass
    inputs = gpt2.tokenizer(prompts, return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    column = int(real[0].nonzero()[7])  # row 0's position 7 among its real tokens
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as `generate` counts a padded row's

    def hook(_, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[0, column] += vector.v.detach()  # row 0 only: row 1 has 5 tokens
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        unsteered = gpt2._module(**inputs).logits
    handle = gpt2.transformer.h[0]._module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = gpt2._module(**inputs).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits[:, -1], expected[:, -1])  # generate keeps the last token's logits only
    assert not torch.allclose(logits[0, -1], unsteered[0, -1])  # row 0 was steered


# ---------------------------------------------------------------------------
# 3. Pixels are not tokens
# ---------------------------------------------------------------------------


def tiny_vit():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4, num_channels=3)
    torch.manual_seed(0)
    return transformers.ViTModel(config).eval()


def test_positions_on_pixel_inputs_are_refused(gpt2):
    model = BatchedNNsight(tiny_vit())
    vector = steering(model.layers[0], output_dim=32)
    pixels = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"token positions of this pass are unknown.*Drop `positions=`"):
        with model.trace() as tracer:
            with tracer.invoke(pixels):
                vector(positions=[0, 1, -2, -1])
                model.layers[0].output.save()


def test_every_patch_token_on_pixel_inputs_matches_a_hook():
    vit = tiny_vit()
    model = BatchedNNsight(vit)
    vector = steering(model.layers[0], output_dim=32)
    pixels = torch.randn(2, 3, 16, 16)
    with model.trace() as tracer:
        with tracer.invoke(pixels[:1]):
            vector()
            first = model.layers[1].output.save()
        with tracer.invoke(pixels[1:]):
            second = model.layers[1].output.save()
    first, second = (value[0] if isinstance(value, tuple) else value for value in (first, second))
    got = torch.cat([first, second])
    handle = vit.layers[0].register_forward_hook(lambda m, a, o: torch.cat([o[:1] + vector.v.detach(), o[1:]]) if not isinstance(o, tuple) else (torch.cat([o[0][:1] + vector.v.detach(), o[0][1:]]), *o[1:]))
    try:
        with torch.no_grad():
            want = vit.layers[1](vit.layers[0](vit.embeddings(pixels)))
    finally:
        handle.remove()
    got = got[0] if isinstance(got, tuple) else got
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(got.detach(), want)


# ---------------------------------------------------------------------------
# 6. A module your own code calls first (a logit lens)
# ---------------------------------------------------------------------------


def test_the_models_own_call_stays_adapted_after_a_logit_lens_and_the_lens_computes_the_base_module(gpt2):
    lens_head = nonzero_lora(gpt2.lm_head)
    with gpt2.trace(PROMPT):
        base = gpt2.lm_head.output.save()
    with pytest.warns(UserWarning, match=r"Your own code ran `model.lm_head` inside the trace.*computes the module's base function"):
        with gpt2.trace(PROMPT):
            lens_head()
            hidden = gpt2.transformer.h[0].output[:, -1]
            hidden_saved = hidden.save()
            lens = gpt2.lm_head(gpt2.transformer.ln_f(hidden)).save()
            adapted = gpt2.lm_head.output.save()
    # The reference: a hook on the raw lm_head adds the delta on the model's call.
    raw = gpt2.lm_head._module
    handle = raw.register_forward_hook(lambda m, a, o: o + a[0] @ lens_head.WA.detach() @ lens_head.WB.detach())
    try:
        with torch.no_grad():
            hf = gpt2._module
            want = hf(PROMPT).logits
    finally:
        handle.remove()
    torch.testing.assert_close(adapted.detach(), want)
    assert not torch.allclose(adapted, base)
    # The rule for your own calls: they compute the base module, as the raw modules do outside a trace.
    with torch.no_grad():
        lens_ref = raw(hf.transformer.ln_f(hidden_saved))
    torch.testing.assert_close(lens.detach(), lens_ref)


def test_an_extra_call_after_the_module_ran_is_harmless(gpt2):
    lens_head = nonzero_lora(gpt2.lm_head)
    with gpt2.trace(PROMPT):
        lens_head()
        adapted = gpt2.lm_head.output.save()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gpt2.trace(PROMPT):
            lens_head()
            again = gpt2.lm_head.output.save()
            gpt2.lm_head(torch.zeros(1, 32)).save()
    torch.testing.assert_close(again, adapted)


# ---------------------------------------------------------------------------
# 4. Time-first when T == B
# ---------------------------------------------------------------------------


def tiny_fsmt():
    config = transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=50, tgt_vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=64, pad_token_id=1, eos_token_id=2, bos_token_id=0, decoder_start_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.FSMTForConditionalGeneration(config).eval()


FSMT_IDS = torch.tensor([[5, 9], [7, 11]])  # 2 rows of 2 tokens: T == B


def test_a_time_first_layer_with_as_many_tokens_as_rows_is_refused_per_invoke():
    model = BatchedNNsight(tiny_fsmt())
    lora = nonzero_lora(model.model.encoder.layers[0].fc1, r=2)
    with pytest.raises(ValueError, match=r"time-first, \(tokens, rows, \.\.\.\).*empty `tracer.invoke\(\)`"):
        with model.trace() as tracer:
            with tracer.invoke(input_ids=FSMT_IDS[:1], decoder_input_ids=FSMT_IDS[:1]):
                lora()
            with tracer.invoke(input_ids=FSMT_IDS[1:], decoder_input_ids=FSMT_IDS[1:]):
                pass


def test_a_time_first_layer_adapted_on_the_whole_batch_matches_a_hook():
    fsmt = tiny_fsmt()
    model = BatchedNNsight(fsmt)
    lora = nonzero_lora(model.model.encoder.layers[0].fc1, r=2)
    with model.trace() as tracer:
        with tracer.invoke(input_ids=FSMT_IDS, decoder_input_ids=FSMT_IDS):
            lora()
            got = model.output.logits.save()
    handle = fsmt.model.encoder.layers[0].fc1.register_forward_hook(lambda m, a, o: o + a[0] @ lora.WA.detach() @ lora.WB.detach())
    try:
        with torch.no_grad():
            want = fsmt(input_ids=FSMT_IDS, decoder_input_ids=FSMT_IDS).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got.detach(), want)


def test_a_batch_first_layer_with_as_many_tokens_as_rows_is_scoped_to_its_rows(gpt2):
    """GPT-2's layers are batch-first; the scan says so, so two 1-row invokes of 2 tokens are scoped exactly."""
    lora = nonzero_lora(gpt2.transformer.h[0].mlp.c_fc)
    ids = torch.tensor([[5, 9], [7, 11]])
    with gpt2.trace() as tracer:
        with tracer.invoke(ids[:1]):
            lora()
            first = gpt2.lm_head.output.save()
        with tracer.invoke(ids[1:]):
            second = gpt2.lm_head.output.save()
    raw = gpt2.transformer.h[0].mlp.c_fc._module

    def first_row_only(module, args, output):
        delta = args[0] @ lora.WA.detach() @ lora.WB.detach()
        return output + torch.cat([delta[:1], torch.zeros_like(delta[1:])])

    handle = raw.register_forward_hook(first_row_only)
    try:
        with torch.no_grad():
            want = gpt2._module(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(torch.cat([first, second]).detach(), want)


# ---------------------------------------------------------------------------
# 5. Teacher forcing and generation agree on the prompt's last token
# ---------------------------------------------------------------------------


def add_at_columns(module, vector, columns, passes=(0,)):
    """A hook adding ``vector`` to ``module``'s output at ``columns[row]`` of each row, on the given passes only."""
    calls = []

    def hook(m, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if len(calls) in passes:
            hidden = hidden.clone()
            for row, column in enumerate(columns):
                hidden[row, column] = hidden[row, column] + vector
        calls.append(1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return module.register_forward_hook(hook)


def test_prompt_positions_in_a_teacher_forced_trace_pick_each_rows_last_prompt_token(gpt2):
    prompts, answers = ["abcdefghij", "abcde"], ["XYZ", "XY"]
    vector = steering(gpt2.transformer.h[0])
    with gpt2.trace([p + a for p, a in zip(prompts, answers)]):
        vector(positions=PromptPositions(-1, prompt_lengths=[len(p) for p in prompts]))
        got = gpt2.lm_head.output.save()
    # Left-padded to 13 columns: row 0's prompt ends at column 9, row 1's (7 real tokens) at 6 + 4 = 10.
    batch = gpt2.tokenizer([p + a for p, a in zip(prompts, answers)], return_tensors="pt", padding=True)
    assert batch["attention_mask"].tolist()[1][:6] == [0] * 6
    handle = add_at_columns(gpt2.transformer.h[0]._module, vector.v.detach(), [9, 10])
    try:
        with gpt2.trace([p + a for p, a in zip(prompts, answers)]):  # the same inputs, no intervention: the hook acts
            want = gpt2.lm_head.output.save()
    finally:
        handle.remove()
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.detach()[real], want.detach()[real])


def test_a_vector_trained_at_the_prompts_end_steers_the_same_token_in_generate(gpt2):
    prompt, answer = "abcdefghij", "XYZ"
    vector = steering(gpt2.transformer.h[0])
    optimizer = torch.optim.AdamW(vector.parameters(), lr=0.1)
    target = torch.tensor(gpt2.tokenizer(answer)["input_ids"])
    for _ in range(3):
        with gpt2.trace(prompt + answer):
            vector(positions=PromptPositions(-1, prompt_lengths=len(prompt)))
            logits = gpt2.lm_head.output.save()
        loss = torch.nn.functional.cross_entropy(logits[0, len(prompt) - 1 : -1], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with gpt2.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
        vector(positions=-1)  # generate's prompt is the whole input: -1 is the same token
        steered = tracer.result.save()
    handle = add_at_columns(gpt2.transformer.h[0]._module, vector.v.detach(), [len(prompt) - 1])
    try:
        with gpt2.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
            hooked = tracer.result.save()
    finally:
        handle.remove()
    with gpt2.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
        base = tracer.result.save()
    assert steered.tolist() == hooked.tolist()
    with gpt2.trace(prompt):  # the vector changes the prompt's last token's logits: the comparison is not vacuous
        vector(positions=-1)
        moved = gpt2.lm_head.output[0, -1].save()
    with gpt2.trace(prompt):
        still = gpt2.lm_head.output[0, -1].save()
    assert not torch.allclose(moved, still)
    assert base.shape == steered.shape


def test_prompt_positions_refuse_lengths_that_do_not_fit(gpt2):
    vector = steering(gpt2.transformer.h[0])
    with pytest.raises(ValueError, match=r"gives 3 prompt lengths, and its invoke has 2 rows"):
        with gpt2.trace(["abcdef", "abcd"]):
            vector(positions=PromptPositions(-1, prompt_lengths=[3, 2, 1]))
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have \[4\] real tokens"):
        with gpt2.trace(["abcdef", "abcd"]):
            vector(positions=PromptPositions(-1, prompt_lengths=[3, 5]))
    for bad in (0, [2, -1], "3", [], 2.5):
        with pytest.raises(ValueError, match=r"`prompt_lengths` must be a positive int"):
            PromptPositions(-1, prompt_lengths=bad)
    with pytest.raises(ValueError, match=r"`positions` must be None"):
        PromptPositions("last", prompt_lengths=3)
