"""A kind defined outside the package works end to end with no change to the package.

`own_kind.PerChannelScale` (``h * (1 + alpha * s)``) is compared with a plain torch
forward hook that computes the same scale on the raw module, on the rows and
tokens it should act on: per-invoke rows, ``positions=``, generation and gradients.
Then it saves and loads alone, and inside an `InterventionSet` beside `LORA`,
`DoRA` and `ModuleCopy`.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import hf_generate, hf_logits, randomize
from own_kind import PerChannelScale

from nnsight_toolbox import DoRA, InterventionSet, LORA, ModuleCopy, ModuleIntervention
from nnsight_toolbox.optim.kinds import KINDS

LAYER = "transformer.h.0"
PROMPTS = ["The Eiffel Tower is in", "Hi"]


def trained(gpt2, seed=0):
    scale = PerChannelScale(gpt2.get(LAYER))
    with torch.no_grad():
        scale.s.copy_(torch.randn(scale.s.shape, generator=torch.Generator().manual_seed(seed)))
    return scale


@contextlib.contextmanager
def scale_hook(gpt2, s, alpha=1.0, rows=None, tokens=None):
    """``h * (1 + alpha * s)`` on the raw block's output, only on ``rows`` and (left-padded) real ``tokens``."""
    module = gpt2._module.get_submodule(LAYER)

    def hook(mod, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        mask = torch.zeros(h.shape[:2], dtype=torch.bool)
        chosen = range(h.shape[0]) if rows is None else rows
        for row in chosen:
            mask[row] = True if tokens is None else False
            if tokens is not None:
                for t in tokens:
                    mask[row, t] = True
        new = torch.where(mask[..., None], h * (1 + alpha * s), h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def test_defining_it_registered_it():
    assert KINDS["PerChannelScale"] is PerChannelScale
    assert PerChannelScale.call_name == "PerChannelScale()"


def test_it_acts_on_its_invokes_rows_only(gpt2):
    scale = trained(gpt2)
    with gpt2.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            scale(alpha=0.5)
            adapted = gpt2.lm_head.output.save()
        with tracer.invoke(PROMPTS[0]):
            base = gpt2.lm_head.output.save()
    with scale_hook(gpt2, scale.s.detach(), alpha=0.5):
        torch.testing.assert_close(adapted, hf_logits(gpt2, PROMPTS[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, hf_logits(gpt2, PROMPTS[0]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-3)


def test_positions_pick_the_tokens_of_each_row(gpt2):
    scale = trained(gpt2, seed=1)
    with gpt2.trace(PROMPTS[0]):
        scale(positions=[0, -1])
        logits = gpt2.lm_head.output.save()
    n = len(gpt2.tokenizer(PROMPTS[0]).input_ids)
    with scale_hook(gpt2, scale.s.detach(), tokens=[0, n - 1]):
        torch.testing.assert_close(logits, hf_logits(gpt2, PROMPTS[0]), rtol=1e-5, atol=1e-5)


def test_it_acts_on_every_generated_token(gpt2):
    scale = trained(gpt2, seed=2)
    with gpt2.generate(PROMPTS[0], max_new_tokens=4, do_sample=False) as tracer:
        scale(alpha=2.0)
        ids = tracer.result.save()
    with scale_hook(gpt2, scale.s.detach(), alpha=2.0):
        assert torch.equal(ids, hf_generate(gpt2, PROMPTS[0], 4))
    assert not torch.equal(ids, hf_generate(gpt2, PROMPTS[0], 4))


@pytest.mark.slow
def test_its_gradient_is_the_hooks(gpt2):
    scale = trained(gpt2, seed=3)
    with gpt2.trace(PROMPTS[0]):
        scale()
        logits = gpt2.lm_head.output.save()
    logits.square().mean().backward()
    s = scale.s.detach().clone().requires_grad_(True)
    with scale_hook(gpt2, s):
        hf_logits_grad = gpt2._module(**gpt2.tokenizer(PROMPTS[0], return_tensors="pt")).logits
    hf_logits_grad.square().mean().backward()
    torch.testing.assert_close(scale.s.grad, s.grad, rtol=1e-5, atol=1e-7)
    assert scale.s.grad.abs().sum() > 0


def test_it_saves_and_loads_alone_bit_for_bit(gpt2, tmp_path):
    scale = trained(gpt2, seed=4)
    scale.metadata["note"] = "a scale"
    scale.eval()
    scale.save(tmp_path / "scale")
    back = PerChannelScale.load(tmp_path / "scale", gpt2.get("transformer.h.1"))
    assert type(back) is PerChannelScale and back.path == "model.transformer.h.1" and not back.training
    assert torch.equal(back.s, scale.s) and back.metadata == {"note": "a scale"}
    assert back.config() == {"dtype": "float32", "output_dim": 32}
    any_kind = ModuleIntervention.load(tmp_path / "scale", gpt2.get(LAYER))
    assert type(any_kind) is PerChannelScale


def test_it_saves_and_loads_in_a_set_with_the_packages_kinds(gpt2, tmp_path):
    scale = trained(gpt2, seed=5)
    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=2, bias=True)
    dora = DoRA(gpt2.transformer.h[0].mlp.c_proj, r=2)
    copy = ModuleCopy(gpt2.transformer.ln_f)
    for member in (lora, dora):
        randomize(member, seed=6)
    with torch.no_grad():
        lora.bias.fill_(0.3)
        dora.magnitude.mul_(1.2)
        copy.copy.weight.mul_(0.9)
    mix = InterventionSet([scale, lora, dora, copy])
    mix.save(tmp_path / "mix")
    back = InterventionSet.load(tmp_path / "mix", gpt2)
    assert [type(m) for m in back] == [PerChannelScale, LORA, DoRA, ModuleCopy]
    for key, value in mix.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with gpt2.trace(PROMPTS[0]):
        mix()
        first = gpt2.lm_head.output.save()
    with gpt2.trace(PROMPTS[0]):
        back()
        second = gpt2.lm_head.output.save()
    assert torch.equal(first, second) and not torch.allclose(first, hf_logits(gpt2, PROMPTS[0]), atol=1e-3)


def test_a_kind_defined_again_replaces_the_old_one_for_loading(gpt2, tmp_path):
    trained(gpt2).save(tmp_path / "scale")

    class PerChannelScale(ModuleIntervention):  # the same name: a notebook cell run again
        def __init__(self, module, *, dtype=torch.float32, output_dim=None):
            ModuleIntervention.__init__(self, module, dtype=dtype, output_dim=output_dim)
            self.s = torch.nn.Parameter(torch.zeros(self.output_dim, dtype=dtype))

        def intervene(self, output, x, alpha):
            return output * (1 + alpha * self.s)

    try:
        assert type(ModuleIntervention.load(tmp_path / "scale", gpt2.get(LAYER))) is PerChannelScale
    finally:
        import own_kind

        KINDS["PerChannelScale"] = own_kind.PerChannelScale  # the module's class again, for the other tests


def test_a_kind_whose_config_cannot_be_read_says_how_to_fix_it(gpt2, tmp_path):
    class Forgetful(ModuleIntervention):
        def __init__(self, module, width, *, dtype=torch.float32):
            ModuleIntervention.__init__(self, module, dtype=dtype, output_dim=width)

        def intervene(self, output, x, alpha):
            return output

    with pytest.raises(TypeError, match=r"no `self\.width`\. Store it in `__init__`, or define `config\(\)`"):
        Forgetful(gpt2.get(LAYER), 32).save(tmp_path / "f")
    assert not (tmp_path / "f").exists()
