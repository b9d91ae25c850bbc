"""Gradients reach WA/WB and equal those of the plain torch reference; training works."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TARGETS, envoy_at, hf_logits, randomize

from nnsight_toolbox import LORA

PROMPT = "The Eiffel Tower is in"


def reference_grads(model, path, lora, alpha=1.0):
    """Gradients of the same loss through a forward hook on leaf copies of WA/WB."""
    WA = lora.WA.detach().clone().requires_grad_(True)
    WB = lora.WB.detach().clone().requires_grad_(True)
    module = model._module.get_submodule(path)
    handle = module.register_forward_hook(lambda m, i, o: o + alpha * (i[0] @ WA @ WB))
    try:
        batch = model.tokenizer(PROMPT, return_tensors="pt")
        logits = model._module(**batch).logits
        loss_of(logits, batch.input_ids).backward()
    finally:
        handle.remove()
    return WA.grad, WB.grad


def loss_of(logits, ids):
    return F.cross_entropy(logits[0, :-1], ids[0, 1:])


def test_gradients_from_a_loss_after_the_trace_equal_the_reference(model, family):
    path = TARGETS[family]["mlp"]
    lora = LORA(envoy_at(model, path), r=4)
    randomize(lora)
    ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    with model.trace(PROMPT):
        lora(alpha=0.5)
        logits = model.lm_head.output.save()
    loss_of(logits, ids).backward()
    expected_a, expected_b = reference_grads(model, path, lora, alpha=0.5)
    assert lora.WA.grad.abs().sum() > 0 and lora.WB.grad.abs().sum() > 0
    torch.testing.assert_close(lora.WA.grad, expected_a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lora.WB.grad, expected_b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gradients_from_a_loss_inside_the_trace_equal_the_reference(gpt2):
    path = TARGETS["gpt2"]["mlp"]
    lora = LORA(envoy_at(gpt2, path), r=4)
    randomize(lora)
    ids = gpt2.tokenizer(PROMPT, return_tensors="pt").input_ids
    with gpt2.trace(PROMPT):
        lora()
        loss = loss_of(gpt2.lm_head.output, ids)
        loss.backward()
    expected_a, expected_b = reference_grads(gpt2, path, lora)
    torch.testing.assert_close(lora.WA.grad, expected_a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lora.WB.grad, expected_b, rtol=1e-4, atol=1e-6)


def test_a_fresh_adapter_gets_a_gradient_on_wb_only(gpt2):
    # With WB = 0 the gradient of WA is zero (it only flows through WB), as in LoRA.
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    ids = gpt2.tokenizer(PROMPT, return_tensors="pt").input_ids
    with gpt2.trace(PROMPT):
        lora()
        logits = gpt2.lm_head.output.save()
    loss_of(logits, ids).backward()
    assert torch.count_nonzero(lora.WA.grad) == 0
    assert torch.count_nonzero(lora.WB.grad) > 0


@pytest.mark.slow
def test_only_the_adapted_invokes_rows_send_gradient(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    ids = gpt2.tokenizer(PROMPT, return_tensors="pt").input_ids
    with gpt2.trace() as tracer:
        with tracer.invoke(PROMPT):
            lora()
            adapted = gpt2.lm_head.output.save()
        with tracer.invoke(PROMPT.upper()):
            other = gpt2.lm_head.output.save()
    loss_of(adapted, ids).backward()
    expected_a, expected_b = reference_grads(gpt2, TARGETS["gpt2"]["mlp"], lora)
    torch.testing.assert_close(lora.WA.grad, expected_a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lora.WB.grad, expected_b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(other, hf_logits(gpt2, PROMPT.upper()), rtol=1e-5, atol=1e-5)  # the other invoke is the base model


@pytest.mark.slow  # a training loop
def test_a_training_loop_lowers_the_loss_and_teaches_the_target(gpt2):
    torch.manual_seed(0)
    lora = LORA(gpt2.transformer.h[0].mlp, r=8)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=5e-2)
    target = gpt2.tokenizer(" Paris").input_ids[1]  # "P"
    before = {name: p.detach().clone() for name, p in gpt2._module.named_parameters()}
    losses, predictions = [], []
    for _ in range(30):
        with gpt2.trace(PROMPT):
            lora()
            logits = gpt2.lm_head.output[0, -1].save()
        loss = F.cross_entropy(logits[None], torch.tensor([target]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        predictions.append(logits.argmax().item())
    assert predictions[0] != target and predictions[-1] == target
    assert losses[-1] < losses[0] - 0.2, losses
    after = dict(gpt2._module.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before), "the base model stays untouched"
