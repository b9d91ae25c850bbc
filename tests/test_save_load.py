"""`lora.save` / `LORA.load`: this package's own format round-trips bit for bit, and
refuses every damaged or mismatched file before building anything."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TARGETS, envoy_at, hf_logits, randomize
from safetensors.torch import save_file

from nnsight_toolbox import LORA
from nnsight_toolbox.artifacts.files import sha256_hex

PROMPT = "The Eiffel Tower is in"
FIXTURE_V1 = Path(__file__).parent / "fixtures" / "lora-format-v1"


def adapted_logits(model, *loras, alpha=1.0):
    with model.trace(PROMPT):
        for lora in loras:
            lora(alpha)
        logits = model.lm_head.output.save()
    return logits


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["linear", "mlp", "embedding"])
def test_save_then_load_is_bitwise_equal(model_paths, family_name, kind, tmp_path):
    from conftest import load

    model = load(model_paths[family_name])
    path = TARGETS[family_name][kind]
    lora = LORA(envoy_at(model, path), r=3, dropout=0.1)
    randomize(lora)
    lora.eval()
    lora.save(tmp_path / "adapter")

    loaded = LORA.load(tmp_path / "adapter", envoy_at(model, path))
    assert torch.equal(loaded.WA, lora.WA) and torch.equal(loaded.WB, lora.WB)
    assert (loaded.r, loaded.input_dim, loaded.output_dim, loaded.takes_ids) == (
        lora.r, lora.input_dim, lora.output_dim, lora.takes_ids,
    )
    assert loaded.dropout == 0.1 and loaded.training is False and loaded.path == lora.path
    assert torch.equal(adapted_logits(model, loaded, alpha=0.5), adapted_logits(model, lora, alpha=0.5))
    assert not torch.equal(adapted_logits(model, loaded), hf_logits(model, PROMPT))


def test_a_bf16_adapter_keeps_its_dtype(gpt2, tmp_path):
    lora = LORA(gpt2.transformer.h[0].mlp.c_fc, r=2, dtype=torch.bfloat16)
    randomize(lora)
    lora.save(tmp_path / "bf16")
    loaded = LORA.load(tmp_path / "bf16", gpt2.transformer.h[0].mlp.c_fc)
    assert loaded.WA.dtype == torch.bfloat16
    assert torch.equal(loaded.WA, lora.WA) and torch.equal(loaded.WB, lora.WB)


def test_the_sidecar_records_what_the_issue_asks(gpt2, tmp_path):
    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=5)
    lora.save(tmp_path / "a")
    sidecar = json.loads((tmp_path / "a" / "interventions.json").read_text())
    assert sidecar["format_version"] == 2 and sidecar["package_version"] == "0.1.0"
    [entry] = sidecar["interventions"]
    assert (entry["kind"], entry["module_path"], entry["module_type"]) == ("LORA", "transformer.h.1.mlp.c_fc", "Conv1D")
    assert entry["config"] == {"r": 5, "dropout": 0.0, "dtype": "float32", "input_dim": 32, "output_dim": 128}
    assert entry["tensors"] == {"WA": {"shape": [32, 5], "dtype": "float32"}, "WB": {"shape": [5, 128], "dtype": "float32"}}


def test_loading_onto_another_path_of_the_same_shape_is_silent(gpt2, tmp_path):
    lora = LORA(gpt2.transformer.h[0].mlp.c_fc, r=2)
    randomize(lora)
    lora.save(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moved = LORA.load(tmp_path / "a", gpt2.transformer.h[1].mlp.c_fc)
    assert moved.path == "model.transformer.h.1.mlp.c_fc"
    assert torch.equal(moved.WB, lora.WB)


def test_loading_onto_a_module_of_other_widths_names_both_shapes(gpt2, tmp_path):
    LORA(gpt2.transformer.h[0].mlp.c_fc, r=2).save(tmp_path / "a")  # (32, 128)
    with pytest.raises(ValueError, match=r"'input_dim': 32, 'output_dim': 128.*input_dim=128, output_dim=32"):
        LORA.load(tmp_path / "a", gpt2.transformer.h[0].mlp.c_proj)  # (128, 32)


def test_files_of_format_version_1_keep_loading(gpt2):
    """A directory written by version 0.1.0, checked in: later versions must read it."""
    lora = LORA.load(FIXTURE_V1, gpt2.transformer.h[1].mlp.c_fc)
    assert torch.equal(lora.WA, torch.arange(64, dtype=torch.float32).reshape(32, 2) / 64 - 0.5)
    assert torch.equal(lora.WB, torch.arange(256, dtype=torch.float32).reshape(2, 128) / 256 - 0.5)


# --- bad input: each error names the file at fault ---------------------------------


@pytest.fixture
def saved(gpt2, tmp_path):
    lora = LORA(gpt2.transformer.h[0].mlp.c_fc, r=2)
    randomize(lora)
    lora.save(tmp_path / "adapter")
    return tmp_path / "adapter"


def rewrite_tensors(directory: Path, tensors: dict) -> None:
    """Write new tensors and a matching checksum, so the checks after the checksum run."""
    save_file({f"0.{k}": v for k, v in tensors.items()}, directory / "interventions.safetensors")
    sidecar = json.loads((directory / "interventions.json").read_text())
    sidecar["sha256"] = sha256_hex((directory / "interventions.safetensors").read_bytes())
    (directory / "interventions.json").write_text(json.dumps(sidecar))


def edit_sidecar(directory: Path, **changes) -> None:
    sidecar = json.loads((directory / "interventions.json").read_text())
    sidecar.update(changes)
    (directory / "interventions.json").write_text(json.dumps(sidecar))


def edit_config(directory: Path, **changes) -> None:
    sidecar = json.loads((directory / "interventions.json").read_text())
    sidecar["interventions"][0]["config"].update(changes)
    (directory / "interventions.json").write_text(json.dumps(sidecar))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


BAD_INPUTS = {
    "no directory": (lambda d: __import__("shutil").rmtree(d), FileNotFoundError, ""),
    "no sidecar": (lambda d: (d / "interventions.json").unlink(), FileNotFoundError, "interventions.json"),
    "no tensors": (lambda d: (d / "interventions.safetensors").unlink(), FileNotFoundError, "interventions.safetensors"),
    "sidecar not JSON": (lambda d: (d / "interventions.json").write_text("{ r: 2"), ValueError, "interventions.json"),
    "another format": (lambda d: edit_sidecar(d, format="something"), ValueError, "interventions.json"),
    "newer format": (lambda d: edit_sidecar(d, format_version=99), ValueError, "Upgrade"),
    "bad field": (lambda d: edit_config(d, r="two"), ValueError, "must be a positive int, got 'two'"),
    "float8 dtype": (lambda d: edit_config(d, dtype="float8_e4m3fn"), ValueError, "torch.float8_e4m3fn"),
    "deeply nested sidecar": (
        lambda d: (d / "interventions.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ValueError,
        "nests its JSON too deeply",
    ),
    "truncated tensors": (lambda d: truncate(d / "interventions.safetensors"), ValueError, "checksum"),
    "truncated, checksum updated": (
        lambda d: (truncate(d / "interventions.safetensors"), edit_sidecar(d, sha256=sha256_hex((d / "interventions.safetensors").read_bytes()))),
        ValueError,
        "not a readable safetensors file",
    ),
    "wrong shape": (
        lambda d: rewrite_tensors(d, {"WA": torch.zeros(32, 3), "WB": torch.zeros(3, 128)}),
        ValueError,
        "(32, 3), but the LORA on `model.transformer.h.0.mlp.c_fc`",
    ),
    "wrong keys": (lambda d: rewrite_tensors(d, {"A": torch.zeros(32, 2)}), ValueError, "missing ['0.WA', '0.WB'], unexpected ['0.A']"),
    "NaN": (
        lambda d: rewrite_tensors(d, {"WA": torch.full((32, 2), float("nan")), "WB": torch.zeros(2, 128)}),
        ValueError,
        "NaN",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_files_are_refused_with_the_file_named(gpt2, saved, case):
    damage, error, needle = BAD_INPUTS[case]
    damage(saved)
    with pytest.raises(error) as info:
        LORA.load(saved, gpt2.transformer.h[0].mlp.c_fc)
    assert str(saved) in str(info.value) and needle in str(info.value)


def test_load_refuses_a_raw_module(gpt2, saved):
    with pytest.raises(TypeError, match="Envoy"):
        LORA.load(saved, gpt2._module.transformer.h[0].mlp.c_fc)
