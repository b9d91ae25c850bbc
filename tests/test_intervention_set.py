"""`InterventionSet`: any mix on one model, switched on in any order, applied in call order, saved as one."""

import contextlib

import pytest
import torch
from conftest import randomize
from position_reference import EVERY, left_padded, positioned_hook, raw_generate, raw_logits

from nnsight_toolbox import LORA, InterventionSet, LoReFT, SoftPrompt, SteeringVector

PROMPTS = ["The Eiffel Tower is in", "Hi", "Paris is the capital"]
C_ATTN, LAYER = "transformer.h.0.attn.c_attn", "transformer.h.1"


def mix(gpt2):
    lora = LORA(gpt2.get(C_ATTN), r=4)
    randomize(lora, scale=1.0)
    reft = LoReFT(gpt2.get(LAYER), r=4)
    with torch.no_grad():
        reft.learned_source.weight.mul_(8.0)
        reft.learned_source.bias.normal_(0, 2.0)
    steer = SteeringVector(gpt2.get(LAYER))
    with torch.no_grad():
        steer.v.copy_(torch.randn(32, generator=torch.Generator().manual_seed(0)) * 3.0)
    return lora, reft, steer


def formulas(lora, reft, steer):
    WA, WB = lora.WA.detach(), lora.WB.detach()
    Rt, W, b = reft.rotate_layer.weight.detach(), reft.learned_source.weight.detach(), reft.learned_source.bias.detach()
    v = steer.v.detach()
    return (
        lambda h, x: h + x @ WA @ WB,
        lambda h, x: h + (h @ W.T + b - h @ Rt) @ Rt.T,
        lambda h, x: h + v,
    )


@contextlib.contextmanager
def hooks(gpt2, batch, pairs):
    """One positioned hook per (path, formula), registered in order (torch runs them in that order)."""
    with contextlib.ExitStack() as stack:
        for path, formula in pairs:
            stack.enter_context(positioned_hook(gpt2._module.get_submodule(path), formula, batch["attention_mask"], [EVERY] * 3))
        yield


@pytest.mark.slow  # trace and generate
def test_a_mix_equals_the_hooks_in_trace_and_generation(gpt2):
    lora, reft, steer = mix(gpt2)
    f_lora, f_reft, f_steer = formulas(lora, reft, steer)
    interventions = InterventionSet([lora, reft, steer])
    assert len(interventions.parameters()) == 2 + 3 + 1
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.trace(PROMPTS):
        interventions()
        logits = gpt2.lm_head.output.save()
    with torch.no_grad(), hooks(gpt2, batch, [(C_ATTN, f_lora), (LAYER, f_reft), (LAYER, f_steer)]):
        expected = raw_logits(gpt2, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real])

    with gpt2.generate(PROMPTS, max_new_tokens=5, do_sample=False) as tracer:
        interventions()
        ids = tracer.result.save()
    with torch.no_grad(), hooks(gpt2, batch, [(C_ATTN, f_lora), (LAYER, f_reft), (LAYER, f_steer)]):
        assert torch.equal(ids, raw_generate(gpt2, batch, 5))


@pytest.mark.slow
def test_switched_on_in_reverse_forward_order_without_out_of_order_error(gpt2):
    lora, reft, steer = mix(gpt2)
    with gpt2.trace(PROMPTS):
        InterventionSet([reft, lora])()  # h.1 before h.0
        h0 = gpt2.transformer.h[0].output.save()  # reading outputs between calls is fine too
        steer()
        logits = gpt2.lm_head.output.save()
    batch = left_padded(gpt2, PROMPTS)
    f_lora, f_reft, f_steer = formulas(lora, reft, steer)
    with torch.no_grad(), hooks(gpt2, batch, [(C_ATTN, f_lora), (LAYER, f_reft), (LAYER, f_steer)]):
        expected = raw_logits(gpt2, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real])


@pytest.mark.slow
def test_two_on_one_module_apply_in_the_order_they_were_switched_on(gpt2):
    lora, reft, steer = mix(gpt2)
    _, f_reft, f_steer = formulas(lora, reft, steer)
    batch = left_padded(gpt2, PROMPTS)
    real = batch["attention_mask"].bool()
    results = {}
    for order in [(steer, reft), (reft, steer)]:
        with gpt2.trace(PROMPTS):
            InterventionSet(order)()
            results[order] = gpt2.lm_head.output.save()
    with torch.no_grad():
        with hooks(gpt2, batch, [(LAYER, f_steer), (LAYER, f_reft)]):
            steer_then_reft = raw_logits(gpt2, batch)
        with hooks(gpt2, batch, [(LAYER, f_reft), (LAYER, f_steer)]):
            reft_then_steer = raw_logits(gpt2, batch)
    assert not torch.allclose(steer_then_reft[real], reft_then_steer[real], atol=1e-3), "the order should matter here"
    torch.testing.assert_close(results[(steer, reft)][real], steer_then_reft[real])
    torch.testing.assert_close(results[(reft, steer)][real], reft_then_steer[real])


@pytest.mark.slow
def test_gradients_reach_every_member(gpt2):
    lora, reft, steer = mix(gpt2)
    interventions = InterventionSet([lora, reft, steer])
    with gpt2.trace(PROMPTS):
        interventions(positions=[0, -1])
        logits = gpt2.lm_head.output.save()
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in interventions.parameters())


def test_save_and_load_as_one_directory(gpt2, tmp_path):
    lora, reft, steer = mix(gpt2)
    soft = SoftPrompt(gpt2.transformer.wte, 2)
    interventions = InterventionSet([lora, reft, steer, soft])
    interventions.save(tmp_path / "mix")
    back = InterventionSet.load(tmp_path / "mix", gpt2)
    assert [type(m).__name__ for m in back] == ["LORA", "LoReFT", "SteeringVector", "SoftPrompt"]
    assert [m.path for m in back] == [m.path for m in interventions]
    for key, value in interventions.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with gpt2.trace(["##" + p for p in PROMPTS]):
        back()
        restored = gpt2.lm_head.output.save()
    with gpt2.trace(["##" + p for p in PROMPTS]):
        interventions()
        original = gpt2.lm_head.output.save()
    assert torch.equal(restored, original)


def test_a_loraset_contributes_its_adapters_and_bad_members_are_refused(gpt2):
    adapters = LORA.on(gpt2, ["c_attn"], r=2)
    interventions = InterventionSet([adapters, SteeringVector(gpt2.get(LAYER))])
    assert len(interventions) == 3
    with pytest.raises(ValueError, match="twice"):
        InterventionSet([interventions[0], interventions[0]])
    with pytest.raises(TypeError, match="got Linear"):
        InterventionSet([torch.nn.Linear(2, 2)])


def test_load_refuses_a_model_without_a_saved_module(gpt2, tmp_path):
    import json

    InterventionSet([SteeringVector(gpt2.get(LAYER))]).save(tmp_path / "mix")
    sidecar = tmp_path / "mix" / "interventions.json"
    data = json.loads(sidecar.read_text())
    data["interventions"][0]["module_path"] = "transformer.h.9"
    sidecar.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"interventions on 1 module\(s\) this model does not have, e.g. `model.transformer.h.9`"):
        InterventionSet.load(tmp_path / "mix", gpt2)


def test_a_member_of_your_own_that_acts_in_its_forward_is_called_as_before(gpt2):
    """A custom `Optimization` with no `intervene` (nnsight's `.output =` in its forward) beside a built-in one."""
    from nnsight_toolbox import Optimization

    class Shift(Optimization):
        def __init__(self, module, width):
            Optimization.__init__(self)
            self.module = module
            self.vector = torch.nn.Parameter(torch.randn(width, generator=torch.Generator().manual_seed(1)))

        def forward(self, alpha=1.0, *, steps=None, positions=None):
            self.module.output = self.module.output + alpha * self.vector

    steer = SteeringVector(gpt2.get("transformer.h.0"))
    with torch.no_grad():
        steer.v.copy_(torch.randn(32, generator=torch.Generator().manual_seed(0)))
    shift = Shift(gpt2.get(LAYER), 32)
    with gpt2.trace(PROMPTS[0]):
        InterventionSet([steer, shift])(alpha=0.5)
        logits = gpt2.lm_head.output.save()

    raw = gpt2._module
    added = {raw.transformer.h[0]: steer.v.detach(), raw.transformer.h[1]: shift.vector.detach()}
    handles = [m.register_forward_hook(lambda mod, args, out, v=v: out + 0.5 * v) for m, v in added.items()]
    try:
        with torch.no_grad():
            expected = raw(**gpt2.tokenizer(PROMPTS[0], return_tensors="pt")).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, raw(**gpt2.tokenizer(PROMPTS[0], return_tensors="pt")).logits, atol=1e-3)
