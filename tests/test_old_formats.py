"""Every directory that earlier versions saved still loads, bit for bit (fixtures in tests/fixtures).

Each fixture was written by the package's own `save` before the unified format
(see tests/fixtures/README.md). The reference is the fixture's own safetensors
file, read with `safetensors` alone: every tensor the loaded object holds must
equal the file's, and the kind, options and training mode must be the saved ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_logits, reference_hook
from safetensors.torch import load_file

from nnsight_toolbox import DiReFT, DoRA, InterventionSet, LORA, LoraSet, LoReFT, ModuleCopy, ModuleIntervention, SoftPrompt, SteeringVector

FIXTURES = Path(__file__).parent / "fixtures"
PROMPT = "The Eiffel Tower is in"

#: fixture -> (module it was saved on, the kind it loads as, options that must come back, training)
SINGLE = {
    "lora-format-v1": ("transformer.h.1.mlp.c_fc", LORA, {"r": 2}, True),
    "lora-format-v2-dora": ("transformer.h.0.mlp.c_fc", DoRA, {"r": 2}, True),
    "lora-format-v2-bias": ("transformer.h.1.mlp.c_fc", LORA, {"r": 2, "bias": True}, False),
    "intervention-format-v1-steering": ("transformer.h.0", SteeringVector, {"dropout": 0.0}, True),
    "intervention-format-v1-soft-prompt": ("transformer.wte", SoftPrompt, {"n": 2}, True),
    "intervention-format-v1-loreft": ("transformer.h.1", LoReFT, {"r": 2, "dropout": 0.05}, True),
    "intervention-format-v1-direft": ("transformer.h.0", DiReFT, {"r": 2, "dtype": "float64"}, False),
}

#: fixture -> (loader, the kinds in order, the file's key for the loaded state_dict's key)
SETS = {
    "lora-set-format-v1": (LoraSet, [LORA, LORA], lambda key: key.removeprefix("model.")),
    "lora-set-format-v2": (LoraSet, [DoRA, LORA, ModuleCopy], lambda key: key.removeprefix("model.")),
    "intervention-set-format-v1": (InterventionSet, [LORA, SteeringVector, LoReFT], lambda key: key),
}


def sidecar_of(directory: Path) -> Path:
    return next(p for p in directory.iterdir() if p.suffix == ".json")


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_a_single_save_of_an_earlier_version_loads_bit_for_bit(gpt2, name):
    path, kind, options, training = SINGLE[name]
    directory = FIXTURES / name
    raw = load_file(directory / sidecar_of(directory).with_suffix(".safetensors").name)
    loaded = kind.load(directory, gpt2.get(path))
    assert type(loaded) is kind and loaded.path == f"model.{path}" and loaded.training is training
    assert {k: v for k, v in loaded.config().items() if k in options} == options
    state = loaded.state_dict()
    assert sorted(state) == sorted(raw)
    for key, tensor in raw.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    assert type(ModuleIntervention.load(directory, gpt2.get(path))) is kind  # any kind, by the name it was saved under


def test_an_earlier_lora_computes_what_a_hook_with_its_file_computes(gpt2):
    raw = load_file(FIXTURES / "lora-format-v1" / "lora.safetensors")
    lora = LORA.load(FIXTURES / "lora-format-v1", gpt2.transformer.h[1].mlp.c_fc)
    with gpt2.trace(PROMPT):
        lora()
        logits = gpt2.lm_head.output.save()
    with reference_hook(gpt2, "transformer.h.1.mlp.c_fc", raw["WA"], raw["WB"]):
        torch.testing.assert_close(logits, hf_logits(gpt2, PROMPT), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SETS))
def test_a_set_of_an_earlier_version_loads_bit_for_bit(gpt2, name):
    loader, kinds, file_key = SETS[name]
    directory = FIXTURES / name
    raw = load_file(directory / sidecar_of(directory).with_suffix(".safetensors").name)
    loaded = loader.load(directory, gpt2)
    members = list(loaded.values()) if isinstance(loaded, LoraSet) else list(loaded)
    assert [type(m) for m in members] == kinds
    state = loaded.state_dict()
    assert sorted(file_key(k) for k in state) == sorted(raw)
    for key, value in state.items():
        assert torch.equal(value, raw[file_key(key)]), key
    entries = json.loads(sidecar_of(directory).read_text())
    entries = entries.get("adapters") or entries.get("interventions")
    assert [m.training for m in members] == [e["training"] for e in entries]


def test_an_earlier_lora_set_loads_as_an_intervention_set_too(gpt2):
    mix = InterventionSet.load(FIXTURES / "lora-set-format-v2", gpt2)
    assert [type(m).__name__ for m in mix] == ["DoRA", "LORA", "ModuleCopy"]
