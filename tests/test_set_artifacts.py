"""`LoraSet.save` / `LoraSet.load` and set-wide `merge`: round trips against plain hooks,
and every bad file, bad model and failed merge leaves nothing built and nothing changed."""

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_generate, hf_logits, load, randomize, randomized, reference_hooks
from safetensors.torch import load_file, save_file

from nnsight_toolbox import LORA, LoraSet
from nnsight_toolbox.artifacts.files import sha256_hex

PROMPT = "The Eiffel Tower is in"
MANY = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"]}


def set_logits(model, adapters, alpha=1.0):
    with model.trace(PROMPT):
        adapters(alpha)
        logits = model.lm_head.output.save()
    return logits


def mixed_set(gpt2):
    """Different ranks, dtypes and kinds of target: a Conv1D, a block, an embedding, a bf16 adapter."""
    adapters = LoraSet([
        LORA(gpt2.transformer.wte, r=2),
        LORA(gpt2.transformer.h[0].mlp, r=3, dropout=0.1),
        LORA(gpt2.transformer.h[1].attn.c_attn, r=5, dtype=torch.bfloat16),
    ])
    return randomized(adapters)


def test_a_saved_set_loads_onto_a_fresh_model_and_computes_what_hooks_do(model_paths, family, tmp_path):
    model = load(model_paths[family])
    adapters = randomized(LORA.on(model, MANY[family], r=4))
    adapters.save(tmp_path / "set")

    fresh = load(model_paths[family])  # another instance, loaded from disk again
    loaded = LoraSet.load(tmp_path / "set", fresh)
    assert list(loaded) == list(adapters)
    for path, lora in adapters.items():
        assert torch.equal(loaded[path].WA, lora.WA) and torch.equal(loaded[path].WB, lora.WB)
        assert loaded[path].module._module is fresh._module.get_submodule(path.split(".", 1)[1])
    logits = set_logits(fresh, loaded, alpha=0.7)
    with reference_hooks(fresh, adapters, alpha=0.7):
        expected = hf_logits(fresh, PROMPT)
    assert not torch.allclose(expected, hf_logits(fresh, PROMPT), atol=1e-4), "the adapters should change the logits"
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_set_loads_onto_a_model_whose_weights_are_not_loaded_yet(model_paths, tmp_path):
    from nnsight import LanguageModel
    from transformers import AutoTokenizer

    path = model_paths["llama"]
    model = load(path)
    adapters = randomized(LORA.on(model, MANY["llama"], r=4))
    adapters.save(tmp_path / "set")
    expected = set_logits(model, adapters)

    meta = LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path))  # weights load at the first trace
    loaded = LoraSet.load(tmp_path / "set", meta)
    assert all(lora.WA.device.type == "cpu" for lora in loaded.values())
    torch.testing.assert_close(set_logits(meta, loaded), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_mixed_ranks_dtypes_and_targets_round_trip_bit_for_bit(gpt2, tmp_path):
    adapters = mixed_set(gpt2)
    adapters.eval()
    adapters.save(tmp_path / "set")
    loaded = LoraSet.load(tmp_path / "set", gpt2)
    for path, lora in adapters.items():
        twin = loaded[path]
        assert (twin.r, twin.input_dim, twin.output_dim, twin.takes_ids, twin.dropout, twin.training) == (
            lora.r, lora.input_dim, lora.output_dim, lora.takes_ids, lora.dropout, lora.training,
        )
        assert twin.WA.dtype == lora.WA.dtype and torch.equal(twin.WA, lora.WA) and torch.equal(twin.WB, lora.WB)
    assert torch.equal(set_logits(gpt2, loaded), set_logits(gpt2, adapters))


def test_the_files_are_one_tensor_file_keyed_by_entry_and_a_sidecar(gpt2, tmp_path):
    adapters = randomized(LORA.on(gpt2, ["c_attn"], r=4))
    adapters.save(tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["interventions.json", "interventions.safetensors"]
    tensors = load_file(tmp_path / "set" / "interventions.safetensors")
    assert sorted(tensors) == [f"{i}.{w}" for i in (0, 1) for w in ("WA", "WB")]
    assert torch.equal(tensors["1.WB"], adapters["transformer.h.1.attn.c_attn"].WB)
    sidecar = json.loads((tmp_path / "set" / "interventions.json").read_text())
    assert sidecar["format"] == "nnsight-toolbox/intervention-set" and sidecar["format_version"] == 2
    entries = sidecar["interventions"]
    assert [e["module_path"] for e in entries] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert entries[0]["kind"] == "LORA" and entries[0]["config"]["r"] == 4 and entries[0]["module_type"] == "Conv1D"
    assert sidecar["sha256"] == sha256_hex((tmp_path / "set" / "interventions.safetensors").read_bytes())


def test_saving_again_replaces_the_files(gpt2, tmp_path):
    adapters = randomized(LORA.on(gpt2, ["c_attn"], r=4))
    adapters.save(tmp_path / "set")
    with torch.no_grad():
        adapters["transformer.h.0.attn.c_attn"].WB.add_(1.0)
    adapters.save(tmp_path / "set")
    loaded = LoraSet.load(tmp_path / "set", gpt2)
    assert torch.equal(loaded["transformer.h.0.attn.c_attn"].WB, adapters["transformer.h.0.attn.c_attn"].WB)
    assert not [p for p in (tmp_path / "set").iterdir() if p.name.endswith(".tmp")]


FIXTURE_V1 = Path(__file__).parent / "fixtures" / "lora-set-format-v1"


def test_a_set_saved_by_format_version_1_still_loads(gpt2):
    """A checked-in set written by format version 1: later versions must keep reading it."""
    loaded = LoraSet.load(FIXTURE_V1, gpt2)
    assert list(loaded) == ["model.transformer.h.0.attn.c_attn", "model.transformer.h.1.mlp"]
    attn, mlp = loaded.values()
    assert (attn.r, mlp.r) == (2, 1)
    assert torch.equal(attn.WA, torch.arange(64, dtype=torch.float32).reshape(32, 2) / 64 - 0.5)
    assert torch.equal(attn.WB, torch.arange(192, dtype=torch.float32).reshape(2, 96) / 192 - 0.5)
    assert torch.equal(mlp.WB, torch.arange(32, dtype=torch.float32).reshape(1, 32) / 32 - 0.5)


# -- bad files: each names what is wrong, and nothing is built ----------------------


def saved(gpt2, tmp_path) -> Path:
    directory = tmp_path / "set"
    randomized(LORA.on(gpt2, ["c_attn"], r=4)).save(directory)
    return directory


def rewrite_sidecar(directory: Path, change) -> None:
    sidecar = json.loads((directory / "interventions.json").read_text())
    change(sidecar)
    (directory / "interventions.json").write_text(json.dumps(sidecar))


def rewrite_tensors(directory: Path, change) -> None:
    """Change the tensors and record the new checksum, so the check under test is the one that fires."""
    tensors = load_file(directory / "interventions.safetensors")
    change(tensors)
    save_file(tensors, directory / "interventions.safetensors")
    data = (directory / "interventions.safetensors").read_bytes()
    rewrite_sidecar(directory, lambda s: s.update(sha256=sha256_hex(data)))


BAD_FILES = {
    "missing sidecar": (lambda d: (d / "interventions.json").unlink(), FileNotFoundError, r"has no `interventions\.json`"),
    "missing tensors": (lambda d: (d / "interventions.safetensors").unlink(), FileNotFoundError, r"interventions\.safetensors` is missing"),
    "sidecar not json": (lambda d: (d / "interventions.json").write_text("{oops"), ValueError, "not valid JSON"),
    "truncated tensors": (
        lambda d: (d / "interventions.safetensors").write_bytes((d / "interventions.safetensors").read_bytes()[:-9]),
        ValueError,
        "does not match the checksum",
    ),
    "other format": (lambda d: rewrite_sidecar(d, lambda s: s.update(format="nnsight-toolbox/lora")), ValueError, "is not a sidecar of this package's 'nnsight-toolbox/intervention-set' format"),
    "newer version": (lambda d: rewrite_sidecar(d, lambda s: s.update(format_version=3)), ValueError, "Upgrade nnsight-toolbox"),
    "no adapters": (lambda d: rewrite_sidecar(d, lambda s: s.update(interventions=[])), ValueError, "non-empty list"),
    "bad rank": (
        lambda d: rewrite_sidecar(d, lambda s: s["interventions"][1]["config"].update(r=0)),
        ValueError,
        r"LORA on `model\.transformer\.h\.1\.attn\.c_attn`: the saved options .* positive int, got 0",
    ),
    "bad dtype": (lambda d: rewrite_sidecar(d, lambda s: s["interventions"][0]["config"].update(dtype="int8")), ValueError, "floating torch dtype"),
    "path twice": (
        lambda d: rewrite_sidecar(d, lambda s: s["interventions"][1].update(module_path=s["interventions"][0]["module_path"])),
        ValueError,
        "same module",
    ),
    "missing tensor": (
        lambda d: rewrite_tensors(d, lambda t: t.pop("1.WB")),
        ValueError,
        r"missing \['1\.WB'\]",
    ),
    "wrong shape": (
        lambda d: rewrite_tensors(d, lambda t: t.update({"0.WA": torch.zeros(32, 3)})),
        ValueError,
        r"tensor `0\.WA` is torch\.float32 \(32, 3\), but the LORA on `model\.transformer\.h\.0\.attn\.c_attn`",
    ),
    "nan": (
        lambda d: rewrite_tensors(d, lambda t: t["1.WB"].__setitem__((0, 0), float("nan"))),
        ValueError,
        "NaN or infinite",
    ),
}


@pytest.mark.parametrize("damage", BAD_FILES, ids=list(BAD_FILES))
def test_a_damaged_set_is_refused_naming_the_file(gpt2, tmp_path, damage):
    directory = saved(gpt2, tmp_path)
    change, error, match = BAD_FILES[damage]
    change(directory)
    with pytest.raises(error, match=match):
        LoraSet.load(directory, gpt2)


def test_a_model_without_the_modules_is_refused_before_anything_is_built(model_paths, tmp_path, monkeypatch):
    gpt2 = load(model_paths["gpt2"])
    directory = saved(gpt2, tmp_path)
    llama = load(model_paths["llama"])
    built = []
    monkeypatch.setattr(LORA, "__init__", lambda self, *a, **k: built.append(a) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(ValueError, match=r"2 module\(s\) this model does not have, e\.g\. `model\.transformer\.h\.0\.attn\.c_attn`"):
        LoraSet.load(directory, llama)
    assert built == []


def test_a_model_of_other_widths_is_refused_naming_both_shapes(model_paths, tmp_path):
    from nnsight_toolbox.testing import save_tiny_model

    gpt2 = load(model_paths["gpt2"])
    directory = saved(gpt2, tmp_path)
    wider = load(save_tiny_model("gpt2", tmp_path / "wider", n_embd=64))
    with pytest.raises(ValueError, match=r"'input_dim': 32, 'output_dim': 96\}, but `model\.transformer\.h\.0\.attn\.c_attn` \(Conv1D\) has input_dim=64, output_dim=192"):
        LoraSet.load(directory, wider)


def test_a_submodule_is_refused_with_a_hint_to_pass_the_model(gpt2, tmp_path):
    directory = saved(gpt2, tmp_path)
    with pytest.raises(ValueError, match=r"needs the whole model.*`model\.transformer`\. Pass `model` itself"):
        LoraSet.load(directory, gpt2.transformer)


def test_one_save_loads_as_a_set_of_one_and_a_set_points_at_its_loader(gpt2, tmp_path):
    one = LORA(gpt2.transformer.h[0].mlp, r=2)
    one.save(tmp_path / "one")
    assert list(LoraSet.load(tmp_path / "one", gpt2)) == ["model.transformer.h.0.mlp"]
    LORA.on(gpt2, ["c_attn"], r=2).save(tmp_path / "set")
    with pytest.raises(ValueError, match=r"collection of 2 interventions, not one.*LoraSet\.load"):
        LORA.load(tmp_path / "set", gpt2.transformer.h[0].mlp)


def test_saving_into_a_file_is_refused(gpt2, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="needs a directory"):
        LORA.on(gpt2, ["c_attn"], r=2).save(tmp_path / "file")


# -- merging a whole set: all or none --------------------------------------------


def weights(model):
    return {name: p.detach().clone() for name, p in model._module.named_parameters()}


@pytest.mark.slow
def test_a_merged_set_computes_the_unmerged_set_and_unmerges_bit_for_bit(gpt2):
    adapters = randomized(LORA.on(gpt2, ["c_attn", "c_fc"], r=4), scale=2.0)
    before = weights(gpt2)
    with gpt2.generate(PROMPT, max_new_tokens=6, do_sample=False) as tracer:
        adapters(alpha=0.5)
        unmerged_ids = tracer.result.save()
    unmerged = set_logits(gpt2, adapters, alpha=0.5)

    adapters.merge(alpha=0.5)
    assert adapters.merged
    torch.testing.assert_close(hf_logits(gpt2, PROMPT), unmerged, rtol=1e-4, atol=1e-4)
    assert torch.equal(hf_generate(gpt2, PROMPT, 6), unmerged_ids)
    with pytest.raises(RuntimeError, match="already merged"):
        adapters.merge()
    with pytest.raises(RuntimeError, match=r"merged into the weights.*adapters\.unmerge\(\)"):
        with gpt2.trace(PROMPT):
            adapters()

    adapters.unmerge()
    assert not adapters.merged
    after = weights(gpt2)
    assert all(torch.equal(after[name], before[name]) for name in before)
    with pytest.raises(RuntimeError, match="nothing to unmerge"):
        adapters.unmerge()


def test_a_set_that_cannot_merge_leaves_every_weight_as_it_was(gpt2):
    # the first Conv1D merges, then the MLP block cannot (it has no single weight)
    adapters = randomized(LoraSet([LORA(gpt2.transformer.h[0].attn.c_attn, r=4), LORA(gpt2.transformer.h[1].mlp, r=4)]))
    before, base = weights(gpt2), hf_logits(gpt2, PROMPT)
    with pytest.raises(TypeError):
        adapters.merge()
    assert not any(lora.merged for lora in adapters.values())
    after = weights(gpt2)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert torch.equal(hf_logits(gpt2, PROMPT), base)


def test_a_merge_that_would_write_nan_leaves_every_weight_as_it_was(gpt2):
    adapters = randomized(LORA.on(gpt2, ["c_attn", "c_fc"], r=4))
    last = list(adapters.values())[-1]
    with torch.no_grad():
        last.WB[0, 0] = float("inf")
    before = weights(gpt2)
    with pytest.raises(ValueError):
        adapters.merge()
    assert not adapters.merged
    after = weights(gpt2)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_a_set_with_one_adapter_merged_by_hand_is_refused(gpt2):
    adapters = randomized(LORA.on(gpt2, ["c_attn"], r=4))
    first = next(iter(adapters.values()))
    first.merge()
    with pytest.raises(RuntimeError, match=r"1 adapter\(s\) of this set are already merged"):
        adapters.merge()
    assert [lora.merged for lora in adapters.values()] == [True, False]
    adapters.unmerge()
    assert not adapters.merged
