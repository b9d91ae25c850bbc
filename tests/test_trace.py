"""`lora()` inside `model.trace`: the adapted model equals a plain torch hook."""

import pytest
import torch
from conftest import TARGETS, envoy_at, hf_logits, load, randomize, reference_hook
from nnsight import NNsight

from nnsight_toolbox import LORA

PROMPT = "The Eiffel Tower is in"


@pytest.mark.parametrize("kind", ["mlp", "linear", "layer", "attn"])
def test_trace_logits_equal_the_reference_hook(model, family, kind):
    path = TARGETS[family][kind]
    lora = LORA(envoy_at(model, path), r=4)
    randomize(lora)
    with model.trace(PROMPT):
        lora(alpha=0.7)
        logits = model.lm_head.output.save()
    with reference_hook(model, path, lora.WA.detach(), lora.WB.detach(), alpha=0.7):
        expected = hf_logits(model, PROMPT)
    base = hf_logits(model, PROMPT)
    assert not torch.allclose(expected, base, atol=1e-4), "the adapter should change the logits"
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_embedding_adapter_equals_the_reference_hook(model, family):
    path = TARGETS[family]["embedding"]
    lora = LORA(envoy_at(model, path), r=4)
    randomize(lora)
    with model.trace(PROMPT):
        lora()
        logits = model.lm_head.output.save()
    with reference_hook(model, path, lora.WA.detach(), lora.WB.detach(), embedding=True):
        expected = hf_logits(model, PROMPT)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_fresh_adapter_changes_nothing(model, family):
    lora = LORA(envoy_at(model, TARGETS[family]["mlp"]), r=8)
    with model.trace(PROMPT):
        lora()
        logits = model.lm_head.output.save()
    assert torch.equal(logits, hf_logits(model, PROMPT))


def test_alpha_scales_only_the_low_rank_term(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    outs = {}
    for alpha in (0.0, 1.0, 2.0):
        with gpt2.trace(PROMPT):
            lora(alpha=alpha)
            outs[alpha] = gpt2.transformer.h[0].mlp.output.save()
    with gpt2.trace(PROMPT):
        base = gpt2.transformer.h[0].mlp.output.save()
    torch.testing.assert_close(outs[0.0], base)
    torch.testing.assert_close(outs[2.0] - base, 2 * (outs[1.0] - base), rtol=1e-5, atol=1e-6)


def test_code_after_the_call_runs_and_sees_the_adapted_output(gpt2):
    path = "transformer.h.0.mlp"
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    with gpt2.trace(PROMPT):
        lora()
        mlp_out = gpt2.transformer.h[0].mlp.output.save()
        later = gpt2.transformer.h[1].output.save()
        logits = gpt2.lm_head.output.save()
    captured = {}
    module = gpt2._module.transformer.h[0].mlp
    grab = module.register_forward_hook(lambda m, i, o: captured.setdefault("mlp", o))
    try:
        with reference_hook(gpt2, path, lora.WA.detach(), lora.WB.detach()):
            expected = hf_logits(gpt2, PROMPT)
    finally:
        grab.remove()
    # The grabbing hook ran before the reference hook added the delta:
    expected_mlp = captured["mlp"] + mlp_in(gpt2) @ lora.WA.detach() @ lora.WB.detach()
    torch.testing.assert_close(mlp_out, expected_mlp, rtol=1e-5, atol=1e-5)
    assert later.shape[-1] == 32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def mlp_in(gpt2):
    captured = {}
    module = gpt2._module.transformer.h[0].mlp
    handle = module.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    try:
        hf_logits(gpt2, PROMPT)
    finally:
        handle.remove()
    return captured["x"]


def test_the_user_can_still_edit_other_modules(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    with gpt2.trace(PROMPT):
        lora()
        gpt2.transformer.h[1].output[:] = 0
        zeroed = gpt2.transformer.h[1].output.save()
    assert torch.count_nonzero(zeroed) == 0


def test_a_bf16_model_gets_an_fp32_adapter_cast_back(model_paths):
    model = load(model_paths["llama"], dtype=torch.bfloat16)
    path = TARGETS["llama"]["mlp"]
    lora = LORA(envoy_at(model, path), r=4)
    assert lora.WA.dtype == torch.float32
    randomize(lora)
    with model.trace(PROMPT):
        lora()
        out = model.model.layers[0].mlp.output.save()
        logits = model.lm_head.output.save()
    assert out.dtype == torch.bfloat16
    with reference_hook(model, path, lora.WA.detach(), lora.WB.detach()):
        expected = hf_logits(model, PROMPT)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_a_non_finite_alpha_is_refused(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    for alpha in (float("nan"), float("inf"), "1", None):
        with pytest.raises(ValueError, match="`alpha` must be a finite number"):
            with gpt2.trace(PROMPT):
                lora(alpha=alpha)


def test_calling_outside_a_trace_is_refused(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    with pytest.raises(RuntimeError, match=r"must be called inside `model.trace"):
        lora()


def test_calling_between_invokes_is_refused_with_where_to_call_it(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    with pytest.raises(RuntimeError, match=r"call it inside the invoke whose rows it should change"):
        with gpt2.trace() as tracer:
            lora()
            with tracer.invoke(PROMPT):
                gpt2.lm_head.output.save()


def test_an_adapter_moved_to_another_module_names_both_shapes(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp.c_fc, r=4)  # 32 -> 128
    lora.module = gpt2.transformer.h[0].mlp.c_proj  # takes 128
    with pytest.raises(ValueError) as info:
        with gpt2.trace(PROMPT):
            lora()
    message = str(info.value)
    assert "(32, 4)" in message and "128" in message and "model.transformer.h.0.mlp.c_proj" in message


def test_an_adapter_whose_output_width_differs_names_both_shapes(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp.c_proj, r=4)  # 128 -> 32
    lora.module = gpt2.transformer.h[0].mlp.act  # 128 -> 128
    with pytest.raises(ValueError) as info:
        with gpt2.trace(PROMPT):
            lora()
    message = str(info.value)
    assert "(4, 32)" in message and "128" in message and "model.transformer.h.0.mlp.act" in message


def test_an_output_without_a_tensor_is_named_at_run_time():
    class NoTensor(torch.nn.Module):
        def forward(self, x):
            return {"note": "no tensors here"}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = NoTensor()
            self.out = torch.nn.Linear(4, 4)

        def forward(self, x):
            self.inner(x)
            return self.out(x)

    net = NNsight(Net())
    lora = LORA(net.inner, r=2, input_dim=4, output_dim=4)
    with pytest.raises(TypeError, match="holds no tensor") as info:
        with net.trace(torch.randn(1, 4)):
            lora()
    assert "model.inner" in str(info.value)


def test_an_adapter_from_another_model_is_refused(model_paths):
    first, second = load(model_paths["gpt2"]), load(model_paths["gpt2"])
    lora = LORA(first.transformer.h[0].mlp, r=4)
    with pytest.raises(RuntimeError, match="different model"):
        with second.trace(PROMPT):
            lora()


def test_transformers_model_works_like_language_model(model_paths):
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    path = model_paths["llama"]
    model = TransformersModel(path, task="text-generation", tokenizer=AutoTokenizer.from_pretrained(path), dispatch=True)
    target = TARGETS["llama"]["mlp"]
    lora = LORA(envoy_at(model, target), r=4)
    randomize(lora)
    with model.trace(PROMPT):
        lora()
        logits = model.lm_head.output.save()
    with reference_hook(model, target, lora.WA.detach(), lora.WB.detach()):
        expected = hf_logits(model, PROMPT)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
