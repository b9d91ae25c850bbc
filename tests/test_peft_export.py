"""`export_peft`: real PEFT and nnsight's own `peft=` loading reproduce `lora(alpha)`."""

import json
from collections.abc import Mapping

import pytest
import torch
from conftest import envoy_at, family_params, load, randomize
from nnsight import TransformersModel
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from nnsight_toolbox import LORA, export_peft

PROMPT = "The Eiffel Tower is in"
ALPHA = 0.7
#: Per family: (HF module name, rank). Non-square layers, two ranks (so `rank_pattern`
#: is needed), and an embedding.
EXPORTED = {
    "gpt2": [("transformer.h.1.mlp.c_fc", 4), ("transformer.h.0.attn.c_attn", 2), ("transformer.wte", 3)],
    "llama": [("model.layers.1.mlp.up_proj", 4), ("model.layers.0.self_attn.q_proj", 2), ("model.embed_tokens", 3)],
}


def trained_adapters(model, family_name):
    loras = {}
    for seed, (name, r) in enumerate(EXPORTED[family_name]):
        lora = LORA(envoy_at(model, name), r=r)
        randomize(lora, seed=seed)
        loras[lora.path] = lora
    return loras


def adapted_logits(model, loras, alpha=ALPHA):
    with model.trace(PROMPT):
        for lora in loras:
            lora(alpha)
        logits = model.lm_head.output.save()
    return logits


def transformers_model(path, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(path)
    return TransformersModel(path, task="text-generation", tokenizer=tokenizer, dispatch=True, **kwargs)


@pytest.fixture(params=family_params(["gpt2", "llama"]))
def exported(request, model_paths, tmp_path):
    """(family, base path, nnsight logits with `lora(ALPHA)`, the adapters, the PEFT directory)."""
    family_name = request.param
    path = model_paths[family_name]
    model = load(path)
    loras = trained_adapters(model, family_name)
    expected = adapted_logits(model, loras.values())
    assert not torch.allclose(expected, adapted_logits(model, []), atol=1e-3), "the adapters should matter"
    directory = export_peft(loras, tmp_path / "peft", alpha=ALPHA)
    return family_name, path, expected, loras, directory


def test_real_peft_reproduces_the_adapters(exported):
    family_name, path, expected, loras, directory = exported
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), directory)
    adapted = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    assert len(adapted) == len(loras), f"exact target names match only the exported modules, got {adapted}"
    batch = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = peft_model(**batch).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_nnsight_peft_argument_reproduces_the_adapters(exported):
    _, path, expected, _, directory = exported
    model = transformers_model(path, peft=str(directory))
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_nnsight_load_adapter_reproduces_the_adapters(exported):
    _, path, expected, _, directory = exported
    model = transformers_model(path)
    model.load_adapter(str(directory))
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_the_files_follow_peft_naming_and_layout(exported):
    family_name, _, _, loras, directory = exported
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(directory / "adapter_model.safetensors")
    names = [name for name, _ in EXPORTED[family_name]]
    assert config["peft_type"] == "LORA" and config["target_modules"] == names
    assert config["fan_in_fan_out"] is (family_name == "gpt2")
    assert config["r"] == 4 and config["lora_alpha"] == pytest.approx(ALPHA * 4)
    for name, lora in zip(names, loras.values()):
        if lora.takes_ids:
            a, b = tensors[f"base_model.model.{name}.lora_embedding_A"], tensors[f"base_model.model.{name}.lora_embedding_B"]
        else:
            a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (lora.r, lora.input_dim) and torch.equal(a, lora.WA.detach().T)
        assert b.shape == (lora.output_dim, lora.r) and torch.equal(b, lora.WB.detach().T)
    assert len(tensors) == 2 * len(names)


class AdapterSet(Mapping):
    """A stand-in for a many-adapter object: any `Mapping[str, LORA]` must export unchanged."""

    def __init__(self, loras):
        self._loras = {lora.path: lora for lora in loras}

    def __getitem__(self, key):
        return self._loras[key]

    def __iter__(self):
        return iter(self._loras)

    def __len__(self):
        return len(self._loras)


@pytest.mark.parametrize("form", ["one", "list", "generator", "mapping"])
def test_every_input_form_writes_the_same_files(gpt2, tmp_path, form):
    loras = trained_adapters(gpt2, "gpt2")
    first = next(iter(loras.values()))
    given = {
        "one": first,
        "list": list(loras.values()),
        "generator": (lora for lora in loras.values()),
        "mapping": AdapterSet(loras.values()),
    }[form]
    export_peft(given, tmp_path / "a")
    export_peft([first] if form == "one" else list(loras.values()), tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_block_target_is_refused_and_points_to_save(gpt2, tmp_path):
    lora = LORA(gpt2.transformer.h[0].mlp, r=2)
    with pytest.raises(TypeError, match=r"model\.transformer\.h\.0\.mlp.*GPT2MLP.*lora\.save"):
        export_peft([LORA(gpt2.transformer.h[1].mlp.c_fc, r=2), lora], tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written when the export is refused"


def test_bad_collections_are_refused(model_paths, gpt2, tmp_path):
    c_fc = LORA(gpt2.transformer.h[0].mlp.c_fc, r=2)
    other_model = load(model_paths["gpt2"])
    with pytest.raises(TypeError, match="LORA"):
        export_peft("not adapters", tmp_path / "x")
    with pytest.raises(TypeError, match="Tensor"):
        export_peft([c_fc, torch.zeros(2)], tmp_path / "x")
    with pytest.raises(ValueError, match="no adapters"):
        export_peft([], tmp_path / "x")
    with pytest.raises(ValueError, match="Two adapters"):
        export_peft([c_fc, LORA(gpt2.transformer.h[0].mlp.c_fc, r=3)], tmp_path / "x")
    with pytest.raises(ValueError, match="different model"):
        export_peft([c_fc, LORA(other_model.transformer.h[1].mlp.c_fc, r=2)], tmp_path / "x")
    with torch.no_grad():
        c_fc.WB[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        export_peft(c_fc, tmp_path / "x")
    assert not (tmp_path / "x").exists()
