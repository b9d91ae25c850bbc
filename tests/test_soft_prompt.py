"""`SoftPrompt` against PEFT's prompt tuning and a plain hook; `import_peft` of a PROMPT_TUNING adapter."""

import copy
import json

import pytest
import torch
from peft import PromptTuningConfig, get_peft_model
from position_reference import left_padded, raw_generate, raw_logits

from nnsight_toolbox import SoftPrompt, import_peft

N = 3
PLACEHOLDER = "#" * N  # the byte-level tokenizer makes one token per character
PROMPTS = ["The Eiffel Tower is in", "Hi", "Paris is the capital"]


def peft_prompt_model(gpt2, seed=0):
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(gpt2._module), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    return peft_model.eval()


def peft_logits(peft_model, gpt2, prompts):
    batch = gpt2.tokenizer(prompts, return_tensors="pt")
    with torch.no_grad():
        return peft_model(**batch).logits  # (B, N + T, V): PEFT prepends the virtual tokens


def test_logits_equal_peft_on_every_position(gpt2, tmp_path):
    peft_model = peft_prompt_model(gpt2)
    peft_model.save_pretrained(tmp_path / "prompt")
    soft = import_peft(gpt2, tmp_path / "prompt")
    assert isinstance(soft, SoftPrompt) and soft.n == N and not soft.training
    assert soft.path == "model.transformer.wte"
    prompts = ["The Eiffel Tower is in", "Paris is the capital!!"]  # same length: PEFT's positions ignore padding
    with gpt2.trace([PLACEHOLDER + p for p in prompts]):
        soft()
        ours = gpt2.lm_head.output.save()
    expected = peft_logits(peft_model, gpt2, prompts)
    with torch.no_grad():
        base = gpt2._module(**gpt2.tokenizer([PLACEHOLDER + p for p in prompts], return_tensors="pt")).logits
    assert not torch.allclose(base, expected, atol=1e-3), "the soft prompt should change the logits"
    torch.testing.assert_close(ours, expected)


def test_peft_configs_that_change_the_forward_are_refused_by_name(gpt2, tmp_path):
    peft_prompt_model(gpt2).save_pretrained(tmp_path / "prompt")
    config_path = tmp_path / "prompt" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for key, value in [("task_type", "SEQ_CLS"), ("num_transformer_submodules", 2), ("modules_to_save", ["lm_head"])]:
        config_path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=f"`{key}`"):
            import_peft(gpt2, tmp_path / "prompt")
    config_path.write_text(json.dumps({**config, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}))
    assert import_peft(gpt2, tmp_path / "prompt").n == N  # an init only chose the starting values


def soft_prompt_hook(gpt2, vectors, attention_mask):
    """Replace each row's first N real tokens' embeddings by ``vectors`` in the first (prefill) call."""
    lengths = attention_mask.sum(1).tolist()
    seen = {"calls": 0}

    def hook(module, args, output):
        seen["calls"] += 1
        if seen["calls"] > 1:
            return output  # decode steps: positions 0..N-1 are in the cache already
        output = output.clone()
        width = output.shape[1]
        for b, length in enumerate(lengths):
            start = width - length  # left padding
            output[b, start : start + N] = vectors.to(output.dtype)
        return output

    return gpt2._module.transformer.wte.register_forward_hook(hook)


def randomized(gpt2, seed=0):
    soft = SoftPrompt(gpt2.transformer.wte, N)
    with torch.no_grad():
        soft.embeddings.copy_(torch.randn(N, 32, generator=torch.Generator().manual_seed(seed)))
    return soft


@pytest.mark.slow
def test_left_padded_batch_and_gradients_equal_the_hook(gpt2):
    soft = randomized(gpt2)
    prompts = [PLACEHOLDER + p for p in PROMPTS]
    batch = left_padded(gpt2, prompts)
    real = batch["attention_mask"].bool()
    weights = torch.randn(int(real.sum()), 257, generator=torch.Generator().manual_seed(0))
    with gpt2.trace(prompts):
        soft()
        logits = gpt2.lm_head.output.save()
    (logits[real] * weights).sum().backward()
    vectors = soft.embeddings.detach().clone().requires_grad_()
    handle = soft_prompt_hook(gpt2, vectors, batch["attention_mask"])
    try:
        expected = raw_logits(gpt2, batch)
        (expected[real] * weights).sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(logits[real], expected[real])
    torch.testing.assert_close(soft.embeddings.grad, vectors.grad)


@pytest.mark.slow  # a generate loop
def test_greedy_generation_equals_the_hook(gpt2):
    soft = randomized(gpt2, seed=1)
    prompts = [PLACEHOLDER + p for p in PROMPTS]
    batch = left_padded(gpt2, prompts)
    with gpt2.generate(prompts, max_new_tokens=6, do_sample=False) as tracer:
        soft()
        ids = tracer.result.save()
    handle = soft_prompt_hook(gpt2, soft.embeddings.detach(), batch["attention_mask"])
    try:
        with torch.no_grad():
            expected = raw_generate(gpt2, batch, 6)
    finally:
        handle.remove()
    assert not torch.equal(expected, raw_generate(gpt2, batch, 6)), "the soft prompt should change the text"
    assert torch.equal(ids, expected)


def test_another_start_and_per_invoke(gpt2):
    """``positions=2``: vectors at positions 2..4; one invoke with, one without."""
    soft = randomized(gpt2)
    with gpt2.trace() as tracer:
        with tracer.invoke("ab###Hello"):
            soft(positions=2)
            adapted = gpt2.transformer.wte.output.save()
        with tracer.invoke("ab###Hi"):
            untouched = gpt2.transformer.wte.output.save()
    assert torch.equal(adapted[0, 2:5], soft.embeddings.detach())
    assert torch.equal(untouched[0, -7:], gpt2._module.transformer.wte.weight[gpt2.tokenizer("ab###Hi", return_tensors="pt")["input_ids"][0]])


def test_bad_start_and_short_prompt_are_clear_errors(gpt2):
    soft = randomized(gpt2)
    with pytest.raises(ValueError, match="non-negative int"):
        with gpt2.trace("###Hello"):
            soft(positions=-1)
    with pytest.raises(ValueError, match=r"row\(s\) \[0\]"):
        with gpt2.trace("#"):
            soft()


def test_save_and_load(gpt2, tmp_path):
    soft = randomized(gpt2)
    soft.save(tmp_path / "soft")
    back = SoftPrompt.load(tmp_path / "soft", gpt2.transformer.wte)
    assert back.n == N and torch.equal(back.embeddings, soft.embeddings)
