"""`lora.merge()` / `lora.unmerge()`: the merged model computes the adapter, the unmerged
one the base model bit for bit, and every refusal leaves the weight untouched."""

import warnings

import pytest
import torch
from conftest import envoy_at, hf_generate, hf_logits, load, randomize
from nnsight import LanguageModel
from transformers import AutoTokenizer

from nnsight_toolbox import LORA
from nnsight_toolbox.testing import save_tiny_model

PROMPT = "The Eiffel Tower is in"
#: (family, HF module name): Conv1D and Linear, both non-square, and an untied embedding.
MERGEABLE = [
    ("gpt2", "transformer.h.1.mlp.c_fc"),
    pytest.param("llama", "model.layers.1.mlp.up_proj", marks=pytest.mark.slow),
    pytest.param("llama", "model.embed_tokens", marks=pytest.mark.slow),
]


def expected_weight(kind, weight, WA, WB, alpha):
    """The merged weight, computed here from the definitions: float32, rounded once."""
    delta = alpha * (WA.double() @ WB.double())  # (in, r) @ (r, out)
    if kind == "Linear":
        delta = delta.T  # nn.Linear stores (out, in)
    return (weight.double() + delta).to(weight.dtype)


def traced_logits(model, lora=None, alpha=1.0):
    with model.trace(PROMPT):
        if lora is not None:
            lora(alpha)
        logits = model.lm_head.output.save()
    return logits


@pytest.mark.parametrize("family_name, name", MERGEABLE)
def test_merge_equals_the_adapter_and_unmerge_restores_the_base(model_paths, family_name, name):
    model = load(model_paths[family_name])
    lora = LORA(envoy_at(model, name), r=3)
    randomize(lora)
    layer = model._module.get_submodule(name)
    original = layer.weight.detach().clone()
    base = hf_logits(model, PROMPT)
    adapted = traced_logits(model, lora, alpha=0.6)

    lora.merge(alpha=0.6)
    assert lora.merged
    kind = type(layer).__name__
    torch.testing.assert_close(
        layer.weight.detach(), expected_weight(kind, original, lora.WA.detach(), lora.WB.detach(), 0.6), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(traced_logits(model), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_logits(model, PROMPT), adapted, rtol=1e-5, atol=1e-5)

    lora.unmerge()
    assert not lora.merged
    assert torch.equal(layer.weight, original)
    assert torch.equal(hf_logits(model, PROMPT), base)


@pytest.mark.slow  # a generate loop
def test_merged_generation_equals_the_adapter_token_for_token(gpt2):
    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=4)
    randomize(lora, scale=1.0)
    with gpt2.generate(PROMPT, max_new_tokens=6, do_sample=False) as tracer:
        lora()
        adapted = tracer.result.save()
    base = hf_generate(gpt2, PROMPT, 6)
    assert not torch.equal(adapted, base), "the adapter should change the generation"
    lora.merge()
    assert torch.equal(hf_generate(gpt2, PROMPT, 6), adapted)


def test_bf16_merges_in_float32_and_unmerges_bit_exactly(tmp_path):
    path = save_tiny_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    model = LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path), dispatch=True, dtype=torch.bfloat16)
    layer = model._module.model.layers[1].mlp.up_proj
    assert layer.weight.dtype == torch.bfloat16
    lora = LORA(model.model.layers[1].mlp.up_proj, r=4)
    randomize(lora, scale=0.05)
    original = layer.weight.detach().clone()
    base = hf_logits(model, PROMPT)
    adapted = traced_logits(model, lora)

    lora.merge()
    WA, WB = lora.WA.detach(), lora.WB.detach()
    in_float32 = (original.float() + (WA @ WB).T).to(torch.bfloat16)
    in_bf16 = original + (WA.bfloat16() @ WB.bfloat16()).T
    assert torch.equal(layer.weight, in_float32)
    assert not torch.equal(layer.weight, in_bf16), "the test must tell float32 from bf16 arithmetic"
    # bf16 rounds the weight once (8 bits of mantissa): close to the fp32 adapter, not equal.
    torch.testing.assert_close(traced_logits(model).float(), adapted.float(), rtol=0, atol=0.1)

    lora.unmerge()
    assert torch.equal(layer.weight, original)
    assert torch.equal(hf_logits(model, PROMPT), base)


def test_merging_twice_is_refused_and_changes_nothing(gpt2):
    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=2)
    randomize(lora)
    lora.merge()
    merged = gpt2._module.transformer.h[1].mlp.c_fc.weight.detach().clone()
    with pytest.raises(RuntimeError, match="already merged.*unmerge"):
        lora.merge()
    assert torch.equal(gpt2._module.transformer.h[1].mlp.c_fc.weight, merged)


def test_calling_a_merged_adapter_in_a_trace_is_refused(gpt2):
    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=2)
    randomize(lora)
    lora.merge()
    with pytest.raises(RuntimeError, match="merged into the weights"):
        with gpt2.trace(PROMPT):
            lora()
    lora.unmerge()
    torch.testing.assert_close(traced_logits(gpt2, lora), traced_logits(gpt2, lora))  # usable again


@pytest.mark.parametrize("bad", ["nan", "overflow"])
def test_a_merge_that_would_write_nan_or_inf_is_refused(gpt2, bad):
    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=2)
    randomize(lora)
    alpha = 1.0
    if bad == "nan":
        with torch.no_grad():
            lora.WB[0, 5] = float("nan")
    else:
        gpt2._module.transformer.h[1].mlp.c_fc.half()  # fine in float32, overflows float16's 65504
        alpha = 1e6
    weight = gpt2._module.transformer.h[1].mlp.c_fc.weight
    before = weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or infinite.*unchanged"):
        lora.merge(alpha=alpha)
    assert torch.equal(weight, before) and not lora.merged


def test_merging_a_block_is_a_clear_error(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=2)
    with pytest.raises(TypeError, match=r"model\.transformer\.h\.0\.mlp.*GPT2MLP"):
        lora.merge()


def test_merging_a_tied_weight_is_refused(gpt2):
    lora = LORA(gpt2.transformer.wte, r=2)  # GPT-2 ties wte to lm_head
    randomize(lora)
    before = gpt2._module.lm_head.weight.detach().clone()
    with pytest.raises(RuntimeError, match="tied.*lm_head"):
        lora.merge()
    assert torch.equal(gpt2._module.lm_head.weight, before)


def test_merging_on_a_meta_model_is_a_clear_error(model_paths):
    path = model_paths["llama"]
    meta = LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path))
    lora = LORA(meta.model.layers[0].mlp.up_proj, r=2)
    with pytest.raises(RuntimeError, match="meta device.*dispatch=True"):
        lora.merge()


def test_unmerging_an_unmerged_adapter_is_refused(gpt2):
    with pytest.raises(RuntimeError, match="not merged"):
        LORA(gpt2.transformer.h[1].mlp.c_fc, r=2).unmerge()


def test_training_while_merged_does_not_change_what_unmerge_removes(gpt2):
    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=2)
    randomize(lora)
    weight = gpt2._module.transformer.h[1].mlp.c_fc.weight
    original = weight.detach().clone()
    lora.merge()
    with torch.no_grad():
        lora.WB.mul_(3.0)
    lora.unmerge()
    assert torch.equal(weight, original)


def test_two_adapters_on_one_layer_unmerge_in_any_order(model_paths):
    model = load(model_paths["llama"])
    layer = model._module.model.layers[1].mlp.up_proj
    original = layer.weight.detach().clone()
    first, second = (LORA(model.model.layers[1].mlp.up_proj, r=2) for _ in range(2))
    randomize(first, seed=1)
    randomize(second, seed=2)

    first.merge()
    second.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.unmerge()  # reverse order: the exact copy, silently
        first.unmerge()
    assert torch.equal(layer.weight, original)

    first.merge()
    second.merge()
    with pytest.warns(UserWarning, match="exact only up to rounding"):
        first.unmerge()  # out of order: only `first`'s delta leaves
    only_second = expected_weight("Linear", original, second.WA.detach(), second.WB.detach(), 1.0)
    torch.testing.assert_close(layer.weight.detach(), only_second, rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="exact only up to rounding"):
        second.unmerge()
    torch.testing.assert_close(layer.weight.detach(), original, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family_name, name", [("gpt2", "transformer.h.1.mlp.c_fc"), ("llama", "model.layers.1.mlp.up_proj")])
def test_unmerge_sees_an_edit_that_keeps_the_sum_and_subtracts_only_its_delta(model_paths, family_name, name):
    """Swapping two output neurons after a merge keeps the weight's sum; unmerge must still
    notice, keep the swap, and take out only its own delta (in float32, with a warning)."""
    model = load(model_paths[family_name])
    lora = LORA(envoy_at(model, name), r=2)
    randomize(lora)
    weight = model._module.get_submodule(name).weight
    original = weight.detach().clone()
    lora.merge()
    out_dim = 1 if family_name == "gpt2" else 0  # Conv1D stores (in, out), nn.Linear (out, in)
    with torch.no_grad():
        swapped = weight.detach().index_select(out_dim, torch.tensor([1, 0])).clone()
        weight.narrow(out_dim, 0, 2).copy_(swapped)
    edited = weight.detach().clone()
    with pytest.warns(UserWarning, match="changed after the adapter was merged"):
        lora.unmerge()
    delta = lora.WA.detach().float() @ lora.WB.detach().float()  # (in, out), formed in float32 as documented
    delta = delta if family_name == "gpt2" else delta.T
    assert torch.equal(weight.detach(), (edited.float() - delta).to(weight.dtype))
    assert not torch.equal(weight, original), "the edit was silently undone"


@pytest.mark.parametrize("copier", ["deepcopy", "copy"])
def test_a_copy_of_a_merged_adapter_is_not_merged_so_only_the_original_unmerges(gpt2, copier):
    import copy

    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=2)
    randomize(lora)
    weight = gpt2._module.transformer.h[1].mlp.c_fc.weight
    original = weight.detach().clone()
    lora.merge()
    snapshot = getattr(copy, copier)(lora)
    assert lora.merged and not snapshot.merged
    with pytest.raises(RuntimeError, match="not merged"):
        snapshot.unmerge()
    lora.unmerge()
    assert torch.equal(weight, original)  # the delta left exactly once
    assert torch.equal(snapshot.WB, lora.WB)  # a snapshot of the weights all the same


def test_a_copy_of_a_merged_set_is_not_merged(gpt2):
    import copy

    adapters = LORA.on(gpt2, ["c_fc"], r=2)
    adapters.merge()
    snapshot = copy.deepcopy(adapters)
    assert adapters.merged and not snapshot.merged
    adapters.unmerge()
