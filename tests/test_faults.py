"""Saves that survive interruptions, and loaders that survive hostile files.

A save over an existing adapter is interrupted at every step in turn (a
KeyboardInterrupt from the k-th rename, write, flush, link or delete, for every
k), and the directory must then load as the complete old adapter or the
complete new one, never a mix and never nothing. "Crash" variants also skip
the interrupted save's own clean-up, as a killed process would.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import randomize

from nnsight_toolbox import LORA, LoraSet, export_peft, import_peft
from nnsight_toolbox.artifacts import files

GiB = 1 << 30


# --- the three savers, each with its loader ---------------------------------------


def single(model, seed):
    lora = LORA(model.transformer.h[1].mlp.c_fc, r=2)
    randomize(lora, seed=seed)
    return lora


def save_single(lora, directory):
    lora.save(directory)


def load_single(model, directory):
    loaded = LORA.load(directory, model.transformer.h[1].mlp.c_fc)
    return {"WA": loaded.WA, "WB": loaded.WB}


def a_set(model, seed):
    adapters = LORA.on(model, ["c_fc"], r=2)
    for offset, lora in enumerate(adapters.values()):
        randomize(lora, seed=seed * 10 + offset)
    return adapters


def save_set(adapters, directory):
    adapters.save(directory)


def load_set(model, directory):
    loaded = LoraSet.load(directory, model)
    return {f"{path}.{name}": getattr(lora, name) for path, lora in loaded.items() for name in ("WA", "WB")}


def save_peft(lora, directory):
    export_peft(lora, directory)


def load_peft(model, directory):
    (loaded,) = import_peft(model, directory).values()
    return {"WA": loaded.WA, "WB": loaded.WB}


def weights_of(adapter):
    if isinstance(adapter, LoraSet):
        return {f"{path}.{name}": getattr(lora, name) for path, lora in adapter.items() for name in ("WA", "WB")}
    return {"WA": adapter.WA, "WB": adapter.WB}


FORMATS = {
    "lora.save": (single, save_single, load_single),
    "adapters.save": (a_set, save_set, load_set),
    "export_peft": (single, save_peft, load_peft),
}


class Interrupt:
    """Raise KeyboardInterrupt from the ``k``-th call of any file-system step a save takes.

    Counts both the current writer's steps and the one-file-at-a-time writer's
    (``os.replace``), so the test means the same on either.
    """

    STEPS = [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "link"), (shutil, "rmtree"), (shutil, "copy2")]

    def __init__(self, monkeypatch, k: int) -> None:
        self.k, self.calls, self.fired = k, 0, False
        for owner, name in self.STEPS:
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))
        if hasattr(files, "_write_durably"):
            monkeypatch.setattr(files, "_write_durably", self.wrap(files._write_durably))

    def wrap(self, function):
        def step(*args, **kwargs):
            self.calls += 1
            if self.calls == self.k:
                self.fired = True
                raise KeyboardInterrupt(f"interrupted at step {self.k}")
            return function(*args, **kwargs)

        return step


def same(loaded, expected) -> bool:
    return loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k].detach()) for k in loaded)


def interrupted_saves(gpt2, tmp_path, monkeypatch, fmt, crash):
    """For every step k: save `old`, then save `new` over it interrupted at step k; yield what loads."""
    build, save, load = FORMATS[fmt]
    old, new = build(gpt2, seed=1), build(gpt2, seed=2)
    k = 0
    while True:
        k += 1
        directory = tmp_path / f"k{k}" / "adapter"
        save(old, directory)
        (directory / "notes.txt").write_text("the user's own file")
        with monkeypatch.context() as patch:
            if crash:  # a killed process runs no clean-up: not in `finally`, not at the next load
                patch.setattr(files, "recover_directory", lambda *a, **k: None, raising=False)
            interrupt = Interrupt(patch, k)
            try:
                save(new, directory)
            except KeyboardInterrupt:
                pass
        yield directory, load(gpt2, directory), weights_of(old), weights_of(new)
        if not interrupt.fired:
            assert k > 2, "the save should take several steps"
            return


@pytest.mark.parametrize("crash", [pytest.param(False, id="interrupted"), pytest.param(True, id="crashed", marks=pytest.mark.slow)])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_an_interrupted_save_loads_as_the_old_or_the_new_adapter(gpt2, tmp_path, monkeypatch, fmt, crash):
    outcomes = []
    for directory, loaded, old, new in interrupted_saves(gpt2, tmp_path, monkeypatch, fmt, crash):
        assert same(loaded, old) or same(loaded, new), f"step {len(outcomes) + 1}: neither adapter"
        outcomes.append("new" if same(loaded, new) else "old")
        # Where a loader reads (`saved_directory`; the directory itself before it existed).
        readable = getattr(files, "saved_directory", Path)(directory)
        assert (readable / "notes.txt").read_text() == "the user's own file"
    assert outcomes[0] == "old" and outcomes[-1] == "new"


@pytest.mark.slow  # every step of a save, per format
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_next_save_cleans_up_after_a_crashed_one(gpt2, tmp_path, monkeypatch, fmt):
    build, save, load = FORMATS[fmt]
    third = build(gpt2, seed=3)
    for directory, _, _, _ in interrupted_saves(gpt2, tmp_path, monkeypatch, fmt, crash=True):
        save(third, directory)
        assert same(load(gpt2, directory), weights_of(third))
        assert [p.name for p in directory.parent.iterdir()] == ["adapter"], "a crashed save's leftovers stay"
        assert (directory / "notes.txt").read_text() == "the user's own file"


def test_saving_keeps_other_files_and_folders(gpt2, tmp_path):
    directory = tmp_path / "adapter"
    (directory / "runs" / "1").mkdir(parents=True)
    (directory / "runs" / "1" / "log.txt").write_text("epoch 1")
    (directory / "optimizer.pt").write_bytes(b"\x00" * 10)
    single(gpt2, 1).save(directory)
    single(gpt2, 2).save(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["interventions.json", "interventions.safetensors", "optimizer.pt", "runs"]
    assert (directory / "runs" / "1" / "log.txt").read_text() == "epoch 1"


def test_saving_through_a_symlink_replaces_its_target_and_keeps_the_link(gpt2, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    single(gpt2, 1).save(tmp_path / "link")
    new = single(gpt2, 2)
    new.save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert same(load_single(gpt2, tmp_path / "real"), weights_of(new))
    assert export_peft(new, tmp_path / "link") == tmp_path / "link"  # the path as given


def test_a_load_through_a_symlink_finds_the_copy_a_crashed_save_left_aside(gpt2, tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    old = single(gpt2, 1)
    old.save(tmp_path / "link")
    rename = os.rename

    def rename_aside_only(source, target):
        if Path(target).name != ".real.previous":
            raise KeyboardInterrupt
        rename(source, target)

    with monkeypatch.context() as patch:  # crash right after the old copy was moved aside
        patch.setattr(files, "recover_directory", lambda *a, **k: None)
        patch.setattr(os, "rename", rename_aside_only)
        with pytest.raises(KeyboardInterrupt):
            single(gpt2, 2).save(tmp_path / "link")
    assert not (tmp_path / "real").exists()
    assert same(load_single(gpt2, tmp_path / "link"), weights_of(old))


def test_saving_into_the_working_directory_is_refused(gpt2, tmp_path, monkeypatch):
    single(gpt2, 1).save(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path / "adapter")
    before = sorted(os.listdir("."))
    with pytest.raises(ValueError, match=r"working directory.*subdirectory"):
        single(gpt2, 2).save(".")
    assert sorted(os.listdir(tmp_path / "adapter")) == before


# --- files too large, or whose header promises too much ------------------------------


@pytest.fixture
def no_big_reads(monkeypatch):
    """Fail the test if a loader reads a large file whole."""
    for name in ("read_bytes", "read_text"):
        monkeypatch.setattr(Path, name, guarded(getattr(Path, name)))


def guarded(read):
    def read_small(self, *args, **kwargs):
        size = self.stat().st_size
        assert size < 64 << 20, f"{self} ({size} bytes) was read whole"
        return read(self, *args, **kwargs)

    return read_small


def pad_sparse(path: Path, size: int = 8 * GiB) -> None:
    os.truncate(path, size)  # a hole: costs no disk


@pytest.mark.parametrize(
    "fmt, name", [("lora.save", "interventions.safetensors"), ("adapters.save", "interventions.safetensors"), ("export_peft", "adapter_model.safetensors")]
)
def test_a_sparse_8_gib_tensor_file_is_refused_unread(gpt2, tmp_path, no_big_reads, fmt, name):
    build, save, load = FORMATS[fmt]
    save(build(gpt2, seed=1), tmp_path / "adapter")
    pad_sparse(tmp_path / "adapter" / name)
    with pytest.raises(ValueError, match=rf"{name}` is {8 * GiB} bytes, but its safetensors header describes \d+ bytes"):
        load(gpt2, tmp_path / "adapter")


def write_fake_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A header promising ``tensors`` (dtype code, shape), and a sparse file the size it promises."""
    header, offset = {}, 0
    for name, (code, shape) in tensors.items():
        size = 4 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)


def test_a_header_promising_a_huge_tensor_is_checked_against_the_sidecar_unread(gpt2, tmp_path, no_big_reads):
    single(gpt2, 1).save(tmp_path / "adapter")
    write_fake_safetensors(tmp_path / "adapter" / "interventions.safetensors", {"0.WA": ("F32", [32, 1 << 26]), "0.WB": ("F32", [2, 128])})
    with pytest.raises(ValueError, match=r"tensor `0\.WA` is torch\.float32 \(32, 67108864\).*needs torch\.float32 \(32, 2\)"):
        load_single(gpt2, tmp_path / "adapter")


def test_a_peft_header_promising_a_huge_tensor_is_checked_against_the_model_unread(gpt2, tmp_path, no_big_reads):
    export_peft(single(gpt2, 1), tmp_path / "peft")
    key = "base_model.model.transformer.h.1.mlp.c_fc.lora_{}.weight"
    write_fake_safetensors(
        tmp_path / "peft" / "adapter_model.safetensors", {key.format("A"): ("F32", [2, 1 << 28]), key.format("B"): ("F32", [128, 2])}
    )
    with pytest.raises(ValueError, match=r"lora_A\.weight` has shape \(2, 268435456\).*needs \(2, 32\)"):
        load_peft(gpt2, tmp_path / "peft")


@pytest.mark.parametrize("name", ["interventions.json", "adapter_config.json"])
def test_a_sparse_8_gib_json_file_is_refused_unread(gpt2, tmp_path, no_big_reads, name):
    if name == "interventions.json":
        single(gpt2, 1).save(tmp_path / "adapter")
    else:
        export_peft(single(gpt2, 1), tmp_path / "adapter")
    pad_sparse(tmp_path / "adapter" / name)
    load = load_single if name == "interventions.json" else load_peft
    with pytest.raises(ValueError, match=rf"{name}` is {8 * GiB} bytes, more than"):
        load(gpt2, tmp_path / "adapter")
