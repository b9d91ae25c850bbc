"""`LORA.add_delta`, the fused sum `lora()` uses, equals `output + delta` rounded once."""

import pytest
import torch

from nnsight_toolbox import LORA


@pytest.fixture
def lora(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp.c_fc, r=4)  # 32 -> 128
    with torch.no_grad():
        lora.WB.copy_(torch.randn(lora.WB.shape, generator=torch.Generator().manual_seed(0)))
    return lora


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_same_dtype_equals_output_plus_delta(lora, alpha):
    x, out = torch.randn(2, 5, 32), torch.randn(2, 5, 128)
    torch.testing.assert_close(lora.add_delta(out, x, alpha), out + lora.delta(x, alpha), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", [True, False])
def test_a_bf16_output_is_summed_in_float32_and_rounded_once(lora, grad):
    x, out = torch.randn(2, 5, 32).bfloat16(), torch.randn(2, 5, 128).bfloat16()
    with torch.set_grad_enabled(grad):
        adapted = lora.add_delta(out, x, 0.5)
    expected = (out.float() + lora.delta(x, 0.5)).bfloat16()  # PEFT's cast-up, add, cast-back
    assert adapted.dtype == torch.bfloat16
    assert torch.equal(adapted, expected)
    assert adapted.requires_grad == grad


def test_gradients_through_the_fused_sum_equal_the_plain_sum(lora):
    x = torch.randn(3, 32, requires_grad=True)
    out = torch.randn(3, 128, requires_grad=True)
    lora.add_delta(out, x, 0.7).square().sum().backward()
    fused = [t.grad.clone() for t in (x, out, lora.WA, lora.WB)]
    for t in (x, out, lora.WA, lora.WB):
        t.grad = None
    (out + lora.delta(x, 0.7)).square().sum().backward()
    for got, expected in zip(fused, (x.grad, out.grad, lora.WA.grad, lora.WB.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_output_of_another_shape_is_refused(lora):
    with pytest.raises(ValueError, match="does not match the output"):
        lora.add_delta(torch.randn(2, 5, 96), torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="does not match the output"):
        lora.add_delta(torch.randn(2, 4, 128), torch.randn(2, 5, 32))
    for tokens in (5, 200):  # a one-token delta would broadcast over the output's tokens (small and fused branch)
        with pytest.raises(ValueError, match="does not match the output"):
            lora.add_delta(torch.randn(2, tokens, 128), torch.randn(2, 1, 32))


# Every branch of the delta against the arithmetic written out in plain torch.


@pytest.mark.parametrize("shape", [(1, 1), (2, 7)], ids=["one token", "batch"])
def test_each_branch_equals_plain_torch(lora, shape):
    x, out = torch.randn(*shape, 32), torch.randn(*shape, 128)
    WA, WB = lora.WA.detach(), lora.WB.detach()
    with torch.no_grad():
        torch.testing.assert_close(lora.add_delta(out, x, 0.3), out + 0.3 * (x @ WA @ WB), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora.delta(x.double()), (x.double().float() @ WA) @ WB, rtol=1e-5, atol=1e-5)


def test_dropout_acts_in_training_mode_only(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp.c_fc, r=4, dropout=0.5)
    torch.nn.init.normal_(lora.WB)
    x, out = torch.randn(2, 5, 32), torch.randn(2, 5, 128)
    WA, WB = lora.WA.detach(), lora.WB.detach()
    with torch.no_grad():
        torch.manual_seed(0)
        trained = lora.train().add_delta(out, x)
        torch.manual_seed(0)
        expected = out + torch.nn.functional.dropout(x, 0.5, training=True) @ WA @ WB
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(trained, out + x @ WA @ WB)
        torch.testing.assert_close(lora.eval().add_delta(out, x), out + x @ WA @ WB, rtol=1e-5, atol=1e-5)


def test_an_embedding_adapter_looks_up_rows_by_token_id(gpt2):
    lora = LORA(gpt2.transformer.wte, r=4)
    torch.nn.init.normal_(lora.WB)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    out = torch.randn(1, 5, lora.output_dim)
    with torch.no_grad():
        torch.testing.assert_close(lora.add_delta(out, ids), out + lora.WA[ids] @ lora.WB)
    with pytest.raises(TypeError, match="looks up token ids"):
        lora.add_delta(out, torch.randn(1, 5))


def test_an_input_of_another_width_is_refused(lora):
    with pytest.raises(ValueError, match="must equal the input's last"):
        lora.add_delta(torch.randn(2, 5, 128), torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="must equal the input's last"):
        lora.add_delta(torch.randn(1, 1, 128), torch.randn(1, 1, 33))


def test_a_parametrized_factor_is_used_as_parametrized(lora):
    """`torch.nn.utils.parametrize` moves WA out of the parameter table; the delta still reads its value."""
    from torch.nn.utils import parametrize

    class Halved(torch.nn.Module):
        def forward(self, weight):
            return weight / 2

    x, out = torch.randn(2, 5, 32), torch.randn(2, 5, 128)
    WA, WB = lora.WA.detach().clone(), lora.WB.detach()
    parametrize.register_parametrization(lora, "WA", Halved())
    with torch.no_grad():
        torch.testing.assert_close(lora.add_delta(out, x), out + x @ (WA / 2) @ WB, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora.add_delta(out[:1, :1], x[:1, :1]), out[:1, :1] + x[:1, :1] @ (WA / 2) @ WB, rtol=1e-5, atol=1e-5)
