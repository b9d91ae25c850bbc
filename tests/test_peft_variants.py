"""PEFT's LoRA variants against real PEFT: DoRA, `lora_bias`, `modules_to_save`, several adapters in one tree.

Each case trains a PEFT adapter of that kind for a few AdamW steps (so no part
of it is at its initial value), saves it with `save_pretrained`, imports it,
and compares with `PeftModel`: logits, per-invoke rows (the adapted invoke is
PeftModel, the other the base model), greedy generation token for token, and
merging against PEFT's `merge_and_unload`.
"""

import pytest
import torch
from conftest import family_params, load
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from nnsight_toolbox import LORA, DoRA, LoraSet, ModuleCopy, export_peft, import_peft

PROMPTS = ["The Eiffel Tower is in", "Hello"]
TARGETS = {"gpt2": ["c_fc", "c_attn"], "llama": ["up_proj", "q_proj"]}
#: Per family, the modules PEFT trains whole copies of: GPT-2's head is tied to its
#: embedding, so its final norm; this Llama's head is untied.
COPIES = {"gpt2": ["ln_f"], "llama": ["lm_head", "model.norm"]}
CASES = {
    "dora": lambda family: dict(use_dora=True),
    "lora_bias": lambda family: dict(lora_bias=True),
    "modules_to_save": lambda family: dict(modules_to_save=COPIES[family]),
}


def train_with_peft(path, directory, family, **options):
    """`get_peft_model`, a few AdamW steps on every trainable tensor, `save_pretrained`; returns the trained PeftModel."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=TARGETS[family], **options)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(PROMPTS[0], return_tensors="pt")
    initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    for _ in range(3):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unchanged = [n for n, p in peft_model.named_parameters() if p.requires_grad and torch.equal(p, initial[n])]
    assert not unchanged, f"training left {unchanged} at their initial values"
    peft_model.save_pretrained(directory)
    return peft_model.eval()


def peft_logits(peft_model, tokenizer, prompts=PROMPTS):
    """Logits at the real tokens of a left-padded batch, with positions counted over real tokens (as nnsight's)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = peft_model(**batch, position_ids=positions).logits
    return logits[batch["attention_mask"].bool()]


def traced_logits(model, adapters, prompts=PROMPTS):
    with model.trace(prompts):
        if adapters is not None:
            adapters()
        logits = model.lm_head.output.save()
    mask = model.tokenizer(prompts, return_tensors="pt", padding=True)["attention_mask"]
    return logits[mask.bool()]


@pytest.fixture(params=family_params(["gpt2", "llama"]))
def family_name(request):
    return request.param


@pytest.fixture(scope="module")
def paths(model_paths, tmp_path_factory):
    """The tiny models, GPT-2's with random biases: its initial biases are zero, and a
    formula that mishandles the layer's bias (DoRA must not rescale it) would pass on them."""
    folder = tmp_path_factory.mktemp("biased") / "gpt2"
    hf_model = AutoModelForCausalLM.from_pretrained(model_paths["gpt2"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    hf_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_paths["gpt2"]).save_pretrained(folder)
    return {**model_paths, "gpt2": str(folder)}


@pytest.mark.slow  # PEFT trains first: seconds per case
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_variant_reproduces_peft(paths, tmp_path, family_name, case):
    path = paths[family_name]
    peft_model = train_with_peft(path, tmp_path / "trained", family_name, **CASES[case](family_name))
    model = load(path)
    adapters = import_peft(model, tmp_path / "trained")
    kinds = {type(a).__name__ for a in adapters.values()}
    assert kinds == {"dora": {"DoRA"}, "lora_bias": {"LORA"}, "modules_to_save": {"LORA", "ModuleCopy"}}[case]
    if case == "lora_bias":
        assert all(a.bias is not None and bool(a.bias.ne(0).any()) for a in adapters.values())

    expected = peft_logits(peft_model, model.tokenizer)
    base = traced_logits(model, None)
    assert not torch.allclose(expected, base, atol=1e-3), "training should have changed the model"
    torch.testing.assert_close(traced_logits(model, adapters), expected, rtol=1e-5, atol=1e-5)

    # Per invoke: the adapted invoke is PeftModel, the other the base model, in one batch.
    with model.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            adapters()
            adapted = model.lm_head.output[0].save()
        with tracer.invoke(PROMPTS[0]):
            plain = model.lm_head.output[0].save()
    with peft_model.disable_adapter():
        base_one = peft_logits(peft_model, model.tokenizer, [PROMPTS[0]])
    torch.testing.assert_close(adapted, peft_logits(peft_model, model.tokenizer, [PROMPTS[0]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, base_one, rtol=1e-5, atol=1e-5)

    # Greedy generation, token for token, with the adapter on every step.
    batch = model.tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        peft_ids = peft_model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
    with model.generate(PROMPTS[0], max_new_tokens=6, do_sample=False) as tracer:
        adapters()
        ids = tracer.result.save()
    assert torch.equal(ids, peft_ids)

    # Merging equals PEFT's merge_and_unload, weight for weight; unmerging restores the bits.
    before = {k: v.clone() for k, v in model._module.state_dict().items()}
    merged_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "trained")
    if case == "lora_bias" and family_name == "llama":  # Llama's Linear layers have no bias to merge into
        with pytest.raises(RuntimeError, match="no bias"):
            merged_peft.merge_and_unload()
        with pytest.raises(RuntimeError, match="has none"):
            adapters.merge()
    else:
        reference = merged_peft.merge_and_unload().state_dict()
        adapters.merge()
        state = model._module.state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        torch.testing.assert_close(traced_logits(model, None), expected, rtol=1e-4, atol=1e-4)
        adapters.unmerge()
    after = model._module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_dora_formula_is_what_is_tested(paths, tmp_path):
    """Break the adapter (a magnitude 1% off): the comparison with PEFT must fail."""
    path = paths["gpt2"]
    peft_model = train_with_peft(path, tmp_path / "trained", "gpt2", use_dora=True)
    model = load(path)
    adapters = import_peft(model, tmp_path / "trained")
    expected = peft_logits(peft_model, model.tokenizer)
    for dora in adapters.values():
        dora.magnitude.data.mul_(1.01)
    assert not torch.allclose(traced_logits(model, adapters), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # PEFT trains first
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_then_peft_then_import_round_trips(paths, tmp_path, case):
    path = paths["gpt2"]
    train_with_peft(path, tmp_path / "trained", "gpt2", **CASES[case]("gpt2"))
    model = load(path)
    adapters = import_peft(model, tmp_path / "trained")
    expected = traced_logits(model, adapters)
    export_peft(adapters, tmp_path / "exported")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "exported").eval()
    torch.testing.assert_close(peft_logits(peft_model, model.tokenizer), expected, rtol=1e-5, atol=1e-5)
    again = import_peft(model, tmp_path / "exported")
    assert [type(a) for a in again.values()] == [type(a) for a in adapters.values()]
    torch.testing.assert_close(traced_logits(model, again), expected, rtol=1e-6, atol=1e-6)
    # nnsight's own `peft=` loads it too.
    from nnsight.modeling.transformers import TransformersModel

    loaded = TransformersModel(path, task="text-generation", tokenizer=model.tokenizer, peft=str(tmp_path / "exported"), dispatch=True)
    torch.testing.assert_close(traced_logits(loaded, None), expected, rtol=1e-5, atol=1e-5)


def test_a_tree_of_several_adapters_needs_a_name(model_paths, tmp_path):
    path = model_paths["gpt2"]
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=2, target_modules=["c_fc"]))
    peft_model.add_adapter("second", LoraConfig(r=3, target_modules=["c_attn"], use_dora=True))
    peft_model.save_pretrained(tmp_path / "tree")
    model = load(path)
    with pytest.raises(ValueError, match=r"'default', 'second'.*adapter_name="):
        import_peft(model, tmp_path / "tree")
    default = import_peft(model, tmp_path / "tree", adapter_name="default")
    second = import_peft(model, tmp_path / "tree", adapter_name="second")
    assert [a.r for a in default.values()] == [2, 2] and all(type(a) is LORA for a in default.values())
    assert [a.r for a in second.values()] == [3, 3] and all(type(a) is DoRA for a in second.values())
    with pytest.raises(FileNotFoundError, match=r"no PEFT adapter named 'third'.*'default', 'second'"):
        import_peft(model, tmp_path / "tree", adapter_name="third")
    (tmp_path / "tree" / "adapter_config.json").unlink()  # only the subfolder's adapter is left
    with pytest.raises(FileNotFoundError, match=r"only in subfolders: 'second'.*adapter_name="):
        import_peft(model, tmp_path / "tree")


@pytest.mark.parametrize(
    "config, needle",
    [
        (dict(peft_type="LOHA"), "LOHA"),
        (dict(use_qalora=True), "QALoRA"),
        (dict(alora_invocation_tokens=[1, 2]), "activated LoRA"),
        (dict(target_parameters=["mlp.c_fc.weight"]), "target_parameters"),
    ],
)
def test_other_variants_are_refused_by_name_listing_what_is_supported(gpt2, tmp_path, config, needle):
    import json

    export_peft(LORA(gpt2.transformer.h[0].mlp.c_fc, r=2), tmp_path / "p")
    data = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    data.update(config)
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=needle) as info:
        import_peft(gpt2, tmp_path / "p")
    assert "DoRA (`use_dora`)" in str(info.value) and "`modules_to_save`" in str(info.value)


def test_a_set_of_every_kind_saves_and_loads(gpt2, tmp_path):
    c_fc = LORA(gpt2.transformer.h[0].mlp.c_fc, r=2, bias=True)
    dora = DoRA(gpt2.transformer.h[1].mlp.c_fc, r=2)
    norm = ModuleCopy(gpt2.transformer.ln_f)
    with torch.no_grad():
        for tensor in (c_fc.WB, c_fc.bias, dora.WB, dora.magnitude, norm.copy.weight):
            tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(tensor.numel())))
    adapters = LoraSet([c_fc, dora, norm])
    expected = traced_logits(gpt2, adapters)
    adapters.save(tmp_path / "set")
    again = LoraSet.load(tmp_path / "set", gpt2)
    assert [type(a) for a in again.values()] == [LORA, DoRA, ModuleCopy]
    torch.testing.assert_close(traced_logits(gpt2, again), expected, rtol=0, atol=0)
    dora.save(tmp_path / "one")
    assert type(LORA.load(tmp_path / "one", dora.module)) is DoRA


def test_a_module_copy_needs_a_module_computed_from_its_first_input(gpt2):
    with pytest.raises(TypeError, match=r"`model.transformer.h.0` \(GPT2Block\) also takes `cache`, `attention_mask`"):
        ModuleCopy(gpt2.transformer.h[0])
    with pytest.raises(TypeError, match="also takes"):
        ModuleCopy(gpt2.transformer.h[0].attn)


@pytest.mark.slow
def test_dora_and_copies_import_onto_a_model_not_loaded_yet(paths, tmp_path):
    from nnsight import LanguageModel

    path = paths["llama"]
    peft_model = train_with_peft(path, tmp_path / "trained", "llama", use_dora=True, modules_to_save=COPIES["llama"])
    meta = LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path))  # weights on the meta device
    adapters = import_peft(meta, tmp_path / "trained")
    assert not any(t.is_meta for t in adapters.state_dict().values())
    torch.testing.assert_close(traced_logits(meta, adapters), peft_logits(peft_model, meta.tokenizer), rtol=1e-5, atol=1e-5)


def test_dora_gradients_are_peft_s(paths, tmp_path):
    """The norm is a constant in the backward, as in PEFT: the gradients of every part agree."""
    path = paths["gpt2"]
    peft_model = train_with_peft(path, tmp_path / "trained", "gpt2", use_dora=True)
    model = load(path)
    adapters = import_peft(model, tmp_path / "trained")
    batch = model.tokenizer(PROMPTS[0], return_tensors="pt")
    peft_model.zero_grad()
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    with model.trace(PROMPTS[0]):
        adapters()
        logits = model.lm_head.output.save()
    labels = batch["input_ids"]
    torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:]).backward()
    scale = 12 / 4  # lora_alpha / r, folded into WB on import
    for path_, dora in adapters.items():
        layer = peft_model.base_model.model.get_submodule(path_.removeprefix("model."))
        torch.testing.assert_close(dora.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dora.WA.grad, layer.lora_A["default"].weight.grad.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dora.WB.grad * scale, layer.lora_B["default"].weight.grad.T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["dora", "bias"])
def test_unmerge_after_the_weight_changed_undoes_its_own_change_only(gpt2, kind):
    """Another edit after the merge: unmerge inverts its own formula (DoRA: divides the rows
    back, then subtracts) instead of restoring the copy, and warns."""
    module = gpt2.transformer.h[1].mlp.c_fc
    adapter = DoRA(module, r=2) if kind == "dora" else LORA(module, r=2, bias=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        adapter.WB.copy_(torch.randn(adapter.WB.shape, generator=generator))
        if kind == "dora":
            adapter.magnitude.mul_(1.3)
        else:
            adapter.bias.copy_(torch.randn(adapter.bias.shape, generator=generator))
    weight, bias = module._module.weight, module._module.bias
    before_w, before_b = weight.detach().clone(), bias.detach().clone()
    adapter.merge()
    assert not torch.allclose(weight, before_w) and (kind == "dora" or not torch.allclose(bias, before_b))
    with torch.no_grad():
        weight[0, 0] += 1e-3
        bias[0] += 1e-3
    with pytest.warns(UserWarning, match="changed after"):
        adapter.unmerge()
    expected_w, expected_b = before_w.clone(), before_b.clone()
    expected_b[0] += 1e-3
    # DoRA divides the edit by its row's factor on the way back; only that element moves
    assert (weight - expected_w).abs().flatten().topk(2).values[1] < 1e-5
    torch.testing.assert_close(bias, expected_b, rtol=1e-5, atol=1e-5)


def test_a_copy_of_a_tied_module_is_refused_at_merge_and_changes_nothing(gpt2):
    head = ModuleCopy(gpt2.lm_head)  # GPT-2's head shares its weight with `transformer.wte`
    with torch.no_grad():
        head.copy.weight.mul_(2)
    before = gpt2.lm_head.weight.detach().clone()
    with pytest.raises(RuntimeError, match="tied to other parameters.*transformer.wte.weight"):
        head.merge()
    assert torch.equal(gpt2.lm_head.weight, before) and not head.merged
    with pytest.raises(ValueError, match="alpha=1 only"):
        ModuleCopy(gpt2.transformer.ln_f).merge(alpha=0.5)


def test_dora_on_builds_dora_adapters_on_every_match(model_paths):
    from conftest import load

    from nnsight_toolbox import DoRA

    model = load(model_paths["gpt2"])
    adapters = DoRA.on(model, ["c_fc"], r=4)
    assert list(adapters) == ["model.transformer.h.0.mlp.c_fc", "model.transformer.h.1.mlp.c_fc"]
    assert all(type(a) is DoRA and a.magnitude.shape == (a.output_dim,) for a in adapters.values())
