"""`import_peft`: adapters trained with real PEFT reproduce `PeftModel` inside nnsight traces,
and every bad directory is refused before anything is built."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from nnsight_toolbox import LORA, LoraSet, export_peft, import_peft

PROMPTS = ["The Eiffel Tower is in", "Hello"]
#: Per family: non-square targets, a second kind of layer with its own rank and alpha
#: (`rank_pattern`/`alpha_pattern`), and the embedding.
TRAINED = {
    "gpt2": dict(
        target_modules=["c_fc", "c_attn", "wte"],
        rank_pattern={"c_attn": 3},
        alpha_pattern={"c_attn": 5.0},
    ),
    "llama": dict(
        target_modules=["up_proj", "q_proj", "embed_tokens"],
        rank_pattern={"q_proj": 3},
        alpha_pattern={"q_proj": 5.0},
    ),
}


def train_with_peft(path: str, directory: Path, family_name: str, **overrides) -> Path:
    """A "PEFT-trained" adapter: `get_peft_model` and a few AdamW steps, then `save_pretrained`."""
    torch.manual_seed(0)
    options = dict(r=6, lora_alpha=20, lora_dropout=0.1, **TRAINED[family_name])
    options.update(overrides)
    base = AutoModelForCausalLM.from_pretrained(path)
    peft_model = get_peft_model(base, LoraConfig(**options))
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(PROMPTS[0], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    for _ in range(3):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.save_pretrained(directory)
    return directory


def peft_logits(path: str, directory: Path, tokenizer) -> torch.Tensor:
    """`PeftModel`'s logits at the real (unpadded) tokens of the batch nnsight builds."""
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), directory).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    # Left padding: positions count real tokens only, as in generation.
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = peft_model(**batch, position_ids=positions).logits
    return logits[batch["attention_mask"].bool()]


def traced_logits(model, loras) -> torch.Tensor:
    """nnsight's logits at the real tokens, with ``loras`` switched on."""
    with model.trace(PROMPTS):
        for lora in loras:
            lora()
        logits = model.lm_head.output.save()
    mask = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)["attention_mask"]
    return logits[mask.bool()]


@pytest.mark.slow  # PEFT trains first: seconds per case
@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_peft_trained_adapter_reproduces_peft(model_paths, tmp_path, family_name, use_rslora):
    path = model_paths[family_name]
    directory = train_with_peft(path, tmp_path / "trained", family_name, use_rslora=use_rslora)
    model = load(path)
    loras = import_peft(model, directory)

    order = [name for name, _ in model._module.named_modules()]
    assert list(loras) == sorted(loras, key=lambda p: order.index(p.removeprefix("model.")))
    assert all(lora.path == path_ for path_, lora in loras.items())
    assert len(loras) == 2 * 2 + 1  # two layers in each of two blocks, and the embedding
    ranks = {p.rsplit(".", 1)[-1]: lora.r for p, lora in loras.items()}
    assert ranks["c_attn" if family_name == "gpt2" else "q_proj"] == 3
    assert ranks["c_fc" if family_name == "gpt2" else "up_proj"] == 6

    expected = peft_logits(path, directory, model.tokenizer)
    base = traced_logits(model, [])
    assert not torch.allclose(expected, base, atol=1e-3), "training should have changed the model"
    torch.testing.assert_close(traced_logits(model, loras.values()), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced_logits(model, [loras]), expected, rtol=1e-5, atol=1e-5)  # one call for all


@pytest.mark.slow  # seconds
def test_an_import_is_a_set_that_saves_merges_and_trains(model_paths, tmp_path):
    """`import_peft` returns a `LoraSet`: the whole adapter saves, merges and trains as one."""
    path = model_paths["llama"]
    directory = train_with_peft(path, tmp_path / "trained", "llama")
    model = load(path)
    loras = import_peft(model, directory)
    assert isinstance(loras, LoraSet) and not loras.training
    expected = peft_logits(path, directory, model.tokenizer)

    loras.save(tmp_path / "native")
    again = LoraSet.load(tmp_path / "native", model)
    torch.testing.assert_close(traced_logits(model, [again]), expected, rtol=1e-5, atol=1e-5)

    loras.merge()  # the embedding's adapter too: this Llama's embedding is not tied to its head
    torch.testing.assert_close(traced_logits(model, []), expected, rtol=1e-4, atol=1e-4)
    loras.unmerge()
    assert len(loras.parameters()) == 2 * len(loras)


def test_export_then_import_is_bitwise(gpt2, tmp_path):
    c_fc = LORA(gpt2.transformer.h[1].mlp.c_fc, r=4)
    wte = LORA(gpt2.transformer.wte, r=2)
    for lora in (c_fc, wte):
        with torch.no_grad():
            lora.WB.normal_()
    export_peft([wte, c_fc], tmp_path / "peft")
    loras = import_peft(gpt2, tmp_path / "peft")
    assert list(loras) == ["model.transformer.wte", "model.transformer.h.1.mlp.c_fc"]
    for original in (c_fc, wte):
        back = loras[original.path]
        assert torch.equal(back.WA, original.WA) and torch.equal(back.WB, original.WB)


@pytest.mark.slow  # seconds
def test_imported_adapters_are_in_eval_mode_with_peft_dropout(model_paths, tmp_path):
    directory = train_with_peft(model_paths["gpt2"], tmp_path / "t", "gpt2")
    loras = import_peft(load(model_paths["gpt2"]), directory)
    assert all(not lora.training and lora.dropout == 0.1 for lora in loras.values())


def test_an_import_onto_a_meta_model_builds_cpu_adapters(model_paths, tmp_path):
    from nnsight import LanguageModel

    directory = train_with_peft(model_paths["llama"], tmp_path / "t", "llama")
    path = model_paths["llama"]
    meta = LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path))
    # PEFT saved the embedding's base weight beside the adapter; a meta model cannot be compared.
    with pytest.warns(UserWarning, match="could not be checked"):
        loras = import_peft(meta, directory)
    assert all(lora.WA.device.type == "cpu" for lora in loras.values())
    torch.testing.assert_close(traced_logits(meta, loras.values()), peft_logits(path, directory, meta.tokenizer), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # seconds
def test_a_saved_base_embedding_must_be_the_models_own(model_paths, tmp_path):
    """PEFT saves a targeted embedding's base weight; if it differs, PEFT would swap it in."""
    path = model_paths["llama"]
    directory = train_with_peft(path, tmp_path / "t", "llama")
    model = load(path)
    assert len(import_peft(model, directory)) == 5  # the same weight: accepted
    with torch.no_grad():
        model._module.model.embed_tokens.weight[3, 0] += 1.0
    with pytest.raises(ValueError, match=r"base_layer\.weight` differs"):
        import_peft(model, directory)


def test_a_module_instead_of_the_model_is_refused(gpt2, tmp_path):
    export_peft(LORA(gpt2.transformer.h[1].mlp.c_fc, r=2), tmp_path / "p")
    with pytest.raises(ValueError, match="whole model"):
        import_peft(gpt2.transformer, tmp_path / "p")


# --- bad input: the error names the file, the model is untouched ------------------------


@pytest.fixture
def peft_dir(gpt2, tmp_path):
    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=2)
    with torch.no_grad():
        lora.WB.normal_()
    return export_peft(lora, tmp_path / "peft")


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(directory: Path, change) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


A_KEY = "base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"


def corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    path.write_bytes(bytes(data))


BAD_INPUTS = {
    "no directory": (lambda d: shutil.rmtree(d), FileNotFoundError, "peft"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, "adapter_config.json"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError, "adapter_model.safetensors"),
    "pickled weights only": (
        lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
        ValueError,
        "adapter_model.bin",
    ),
    "config not JSON": (lambda d: (d / "adapter_config.json").write_text("{'r': 2"), ValueError, "adapter_config.json"),
    "wrong peft_type": (lambda d: edit_config(d, peft_type="PREFIX_TUNING"), ValueError, "PREFIX_TUNING"),
    "DoRA flag without magnitudes": (lambda d: edit_config(d, use_dora=True), ValueError, "lora_magnitude_vector"),
    "trained biases": (lambda d: edit_config(d, bias="all"), ValueError, "bias"),
    "PiSSA": (lambda d: edit_config(d, init_lora_weights="pissa"), ValueError, "pissa"),
    "bad r": (lambda d: edit_config(d, r=0), ValueError, "adapter_config.json"),
    "rank disagrees with tensors": (lambda d: edit_config(d, r=5, lora_alpha=5), ValueError, "(5, 32)"),
    "wrong shape": (
        lambda d: edit_tensors(d, lambda t: t.__setitem__(A_KEY, torch.zeros(2, 31))),
        ValueError,
        "(2, 31)",
    ),
    "missing B": (
        lambda d: edit_tensors(d, lambda t: t.pop(A_KEY.replace("lora_A", "lora_B"))),
        ValueError,
        "lora_B.weight",
    ),
    "stray tensor": (
        lambda d: edit_tensors(d, lambda t: t.__setitem__("base_model.model.transformer.h.1.mlp.c_fc.lora_magnitude_vector", torch.ones(128))),
        ValueError,
        "does not set `use_dora`",
    ),
    "unknown module": (
        lambda d: edit_tensors(d, lambda t: t.update({k.replace("h.1", "h.7"): t.pop(k) for k in list(t)})),
        ValueError,
        "transformer.h.7.mlp.c_fc",
    ),
    "linear tensors on an embedding": (
        lambda d: edit_tensors(d, lambda t: t.update({k.replace("h.1.mlp.c_fc", "wte"): t.pop(k) for k in list(t)})),
        ValueError,
        "Embedding",
    ),
    "NaN": (
        lambda d: edit_tensors(d, lambda t: t[A_KEY].fill_(float("nan"))),
        ValueError,
        "NaN",
    ),
    "truncated weights": (
        lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:-50]),
        ValueError,
        "not a readable safetensors file",
    ),
    "corrupted header": (lambda d: corrupt_header(d / "adapter_model.safetensors"), ValueError, "not a readable safetensors file"),
    # PEFT's scale (lora_alpha / r) folded into WB must stay finite in the adapter's dtype.
    "lora_alpha overflows": (lambda d: edit_config(d, lora_alpha=1e300), ValueError, "`lora_alpha`=1e+300"),
    "alpha_pattern overflows": (
        lambda d: edit_config(d, alpha_pattern={"c_fc": 1e300}),
        ValueError,
        "`alpha_pattern` 'c_fc': 1e+300",
    ),
    "zero rank in rank_pattern": (lambda d: edit_config(d, rank_pattern={"c_fc": 0}), ValueError, "gives 'c_fc' the rank 0"),
    "deeply nested config": (
        lambda d: (d / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ValueError,
        "nests its JSON too deeply",
    ),
}


def model_state(model) -> dict:
    return {k: v.clone() for k, v in model._module.state_dict().items()}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_directories_are_refused_and_the_model_is_untouched(gpt2, peft_dir, case):
    damage, error, needle = BAD_INPUTS[case]
    before = model_state(gpt2)
    modules_before = [type(m) for m in gpt2._module.modules()]
    damage(peft_dir)
    with pytest.raises(error) as info:
        import_peft(gpt2, peft_dir)
    message = str(info.value)
    assert str(peft_dir) in message and needle in message, message
    after = model_state(gpt2)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in gpt2._module.modules()] == modules_before


def test_a_real_dora_adapter_on_an_embedding_is_refused_by_name(model_paths, gpt2, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_paths["gpt2"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["wte"], use_dora=True)).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA adapter on the embedding `transformer.wte`"):
        import_peft(gpt2, tmp_path / "dora")


def test_a_real_prompt_tuning_adapter_imports_as_a_soft_prompt_and_prefix_tuning_is_refused(model_paths, gpt2, tmp_path):
    """Prompt tuning is a `SoftPrompt` (compared with PeftModel in test_soft_prompt.py); other types are refused by name."""
    base = AutoModelForCausalLM.from_pretrained(model_paths["gpt2"])
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    get_peft_model(base, config).save_pretrained(tmp_path / "prompt")
    assert type(import_peft(gpt2, tmp_path / "prompt")).__name__ == "SoftPrompt"
    config_path = tmp_path / "prompt" / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"PROMPT_TUNING"', '"PREFIX_TUNING"'))
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        import_peft(gpt2, tmp_path / "prompt")


def test_a_tensor_under_two_keys_is_refused_naming_both(gpt2, peft_dir):
    """With and without PeftModel's prefix, both name one tensor; which wins would depend on read order."""
    bare = A_KEY.removeprefix("base_model.model.")
    edit_tensors(peft_dir, lambda t: t.__setitem__(bare, torch.zeros_like(t[A_KEY])))
    with pytest.raises(ValueError) as info:
        import_peft(gpt2, peft_dir)
    assert f"`{A_KEY}`" in str(info.value) and f"`{bare}`" in str(info.value)


def test_a_large_but_finite_scale_imports_finite_adapters(gpt2, peft_dir):
    """An alpha whose scaled WB still fits float32 imports, and is finite."""
    edit_config(peft_dir, lora_alpha=2e30)
    (lora,) = import_peft(gpt2, peft_dir).values()
    assert bool(torch.isfinite(lora.WB).all()) and lora.WB.abs().max() > 1e29
