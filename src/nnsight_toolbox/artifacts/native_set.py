"""A whole `LoraSet` as one artifact: one safetensors file and one JSON sidecar.

A saved set is a directory::

    <directory>/
        lora_set.safetensors   "<module path>.WA" and "<module path>.WB" for every adapter
                               (and ".bias", ".magnitude" where it has them);
                               "<module path>.copy.<name>" for every tensor of a `ModuleCopy`
        lora_set.json          the format and package versions, the tensor file's
                               SHA-256, and per entry its ``type`` ("LORA", "DoRA" or
                               "ModuleCopy") and what `lora.json` records for one
                               adapter (r, widths, dtype, dropout, training, path), or
                               for a copy the name, shape and dtype of each tensor

Module paths are relative to the model (``transformer.h.0.attn.c_attn``), as in
a Hugging Face ``state_dict``, so the set loads onto any nnsight wrapper of the
same architecture. Loading reads JSON and safetensors only, never pickle, and
checks every adapter (its entry, tensors, checksum, and that the model has the
module with the same widths) before it builds any; a failure names the file and
the adapter at fault, and nothing is built.

Compatibility: a set of plain unbiased `LORA` adapters is written as
``format_version`` 1, read by every version of this package; a set holding a
`DoRA`, a biased adapter or a `ModuleCopy` as version 2, which older versions
refuse with a message to upgrade; a file from a newer version is refused with a message to upgrade.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..optim.paths import envoy_at
from .files import (
    read_header,
    read_json,
    replace_directory,
    require_directory,
    require_file,
    saved_directory,
    sha256_hex,
    tensor_bytes,
)
from dataclasses import dataclass

import torch

from .files import check_finite
from .native import (
    SavedLora,
    adapter_fields,
    adapter_tensors,
    format_version,
    tensor_names,
    build_lora,
    check_adapter_fields,
    check_fits,
    check_format,
    check_layout,
    read_checked_tensors,
    saved_lora,
)

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

    from ..optim.adapter_set import LoraSet

__all__ = ["SET_FORMAT", "SET_FORMAT_VERSION", "SET_TENSORS_FILE", "SET_SIDECAR_FILE", "save_lora_set", "load_lora_set"]

SET_FORMAT = "nnsight-toolbox/lora-set"
#: The newest version this package writes (for a set with a DoRA, a bias or a copy;
#: plain sets are still written as 1). Readers accept every version up to it.
SET_FORMAT_VERSION = 2
SET_TENSORS_FILE = "lora_set.safetensors"
SET_SIDECAR_FILE = "lora_set.json"

_HINT = "Save a set there with `adapters.save(directory)`."


@dataclass(frozen=True)
class SavedCopy:
    """A validated saved `ModuleCopy`, not yet placed on a module."""

    module_path: str
    training: bool
    state: dict[str, torch.Tensor]


def save_lora_set(adapters: "LoraSet", directory: str | os.PathLike) -> Path:
    """Write every adapter of ``adapters`` to ``directory`` (created if needed).

    The directory is replaced as a whole (`files.replace_directory`): if the save
    is interrupted at any point, it loads as the complete old set or the
    complete new one. Other files in it are kept.

    Examples:
        >>> save_lora_set(LORA.on(model, ["c_attn"], r=4), "adapters/set")
        PosixPath('adapters/set')
    """
    from .. import __version__

    from ..optim.module_copy import ModuleCopy

    entries, tensors = [], {}
    for path, lora in adapters.items():
        relative = _relative(path, adapters.root_path)
        if isinstance(lora, ModuleCopy):
            state = lora.copy.state_dict()
            entries.append(
                {
                    "type": "ModuleCopy",
                    "module_path": relative,
                    "module_type": type(lora.module._module).__name__,
                    "training": lora.training,
                    "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()},
                }
            )
            tensors.update({f"{relative}.copy.{k}": v for k, v in state.items()})
            continue
        entries.append(adapter_fields(lora, relative))
        tensors.update({f"{relative}.{name}": tensor for name, tensor in adapter_tensors(lora).items()})
    data = tensor_bytes(tensors)
    sidecar = {
        "format": SET_FORMAT,
        "format_version": format_version(list(adapters.values())),
        "package_version": __version__,
        "adapters": entries,
        "sha256": sha256_hex(data),
    }
    files = {SET_TENSORS_FILE: data, SET_SIDECAR_FILE: (json.dumps(sidecar, indent=2) + "\n").encode()}
    return replace_directory(directory, files, "`adapters.save`")


def load_lora_set(directory: str | os.PathLike, model: "Envoy", cls: type["LoraSet"] | None = None) -> "LoraSet":
    """A new set on ``model``'s modules at the saved paths, holding the saved weights.

    Examples:
        >>> save_lora_set(LORA.on(model, ["c_attn"], r=4), "adapters/set")
        PosixPath('adapters/set')
        >>> list(load_lora_set("adapters/set", model))
        ['model.transformer.h.0.attn.c_attn', 'model.transformer.h.1.attn.c_attn']
    """
    from ..optim.adapter_set import LoraSet
    from ..optim.lora import LORA, _check_envoy

    cls = LoraSet if cls is None else cls
    _check_envoy(model)
    if model.root is not model:
        raise ValueError(
            f"`LoraSet.load` needs the whole model, since a saved set names its modules from "
            f"the model's root; got the module `{model.path}`. Pass `model` itself."
        )
    directory = Path(directory)
    saved = read_saved_set(directory)
    modules = _resolve_modules(saved, model, directory)
    for one, module in zip(saved, modules):
        if isinstance(one, SavedCopy):
            _check_copy_fits(one, module, directory)
        else:
            check_fits(one, module, directory)
    return cls(_build_copy(one, module) if isinstance(one, SavedCopy) else build_lora(one, module, LORA) for one, module in zip(saved, modules))


def _check_copy_fits(saved: SavedCopy, module: "Envoy", directory: Path) -> None:
    own = module._module.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    saved_shapes = {k: tuple(v.shape) for k, v in saved.state.items()}
    if shapes != saved_shapes:
        raise ValueError(
            f"The module copy in `{directory}` for `{saved.module_path}` holds tensors "
            f"{saved_shapes}, but the model's `{module.path}` has {shapes}. Load it onto the "
            f"model it was trained on."
        )


def _build_copy(saved: SavedCopy, module: "Envoy") -> "ModuleCopy":
    from ..optim.module_copy import ModuleCopy

    copy = ModuleCopy._from_state(module, saved.state)
    copy.train(saved.training)
    return copy


def read_saved_set(directory: str | os.PathLike) -> list[SavedLora]:
    """Read and check a saved set: every failure names the file, and the adapter, at fault."""
    directory = saved_directory(directory)  # the old copy, if a save was interrupted mid-swap
    directory = require_directory(directory, "a saved `LoraSet` (`lora_set.json` and `lora_set.safetensors`)", _HINT)
    sidecar_path = require_file(directory / SET_SIDECAR_FILE, "the set's JSON sidecar", _single_hint(directory))
    tensors_path = require_file(directory / SET_TENSORS_FILE, "the set's tensors", _HINT)
    sidecar = read_json(sidecar_path)
    check_format(sidecar, sidecar_path, SET_FORMAT, SET_FORMAT_VERSION, "For one adapter use `LORA.load`; for a PEFT adapter `import_peft`.")
    entries = sidecar.get("adapters")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"`{sidecar_path}`: field `adapters` should be a non-empty list, got {entries!r}.")
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and entry.get("type") == "ModuleCopy":
            _check_copy_fields(entry, f"`{sidecar_path}`, entry {i}")
        else:
            check_adapter_fields(entry, f"`{sidecar_path}`, adapter {i}")
    paths = [entry["module_path"] for entry in entries]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"`{sidecar_path}` lists the module `{twice[0]}` twice; a set holds one adapter per module.")
    if not isinstance(sidecar.get("sha256"), str):
        raise ValueError(f"`{sidecar_path}`: field `sha256` should be a str, got {sidecar.get('sha256')!r}.")

    # The header first: its names, shapes and dtypes must be the sidecar's before any data is read.
    header = read_header(tensors_path, allow_short=True)  # a short file fails the checksum below
    names = {p: _entry_tensor_names(entry) for entry, p in zip(entries, paths)}
    expected = {f"{p}.{name}" for p in paths for name in names[p]}
    if set(header) != expected:
        missing, extra = sorted(expected - set(header)), sorted(set(header) - expected)
        raise ValueError(
            f"`{tensors_path}` does not hold the tensors `{sidecar_path}` lists: "
            f"missing {missing[:4] or 'none'}, unexpected {extra[:4] or 'none'}. The two files do not belong together."
        )
    for entry, p in zip(entries, paths):
        for name in names[p]:
            if entry.get("type") == "ModuleCopy":
                _check_copy_layout(entry, name, header[f"{p}.{name}"], tensors_path, sidecar_path)
            else:
                check_layout(entry, f"{p}.{name}", header[f"{p}.{name}"], tensors_path, sidecar_path)
    tensors = read_checked_tensors(tensors_path, sidecar_path, sidecar["sha256"])
    saved: list[SavedLora | SavedCopy] = []
    for entry, p in zip(entries, paths):
        if entry.get("type") == "ModuleCopy":
            state = {name.removeprefix("copy."): tensors[f"{p}.{name}"] for name in names[p]}
            for name, tensor in state.items():
                if tensor.is_floating_point():
                    check_finite(tensor, f"{p}.copy.{name}", tensors_path)
            saved.append(SavedCopy(module_path=p, training=entry["training"], state=state))
        else:
            saved.append(saved_lora(entry, tensors, tensors_path, sidecar_path, prefix=f"{p}."))
    return saved


def _entry_tensor_names(entry: dict) -> list[str]:
    if entry.get("type") == "ModuleCopy":
        return [f"copy.{name}" for name in entry["tensors"]]
    return tensor_names(entry)


def _check_copy_fields(entry: dict, where: str) -> None:
    if not isinstance(entry.get("module_path"), str) or not isinstance(entry.get("training"), bool):
        raise ValueError(f"{where}: a `ModuleCopy` entry needs `module_path` (a str) and `training` (true or false).")
    tensors = entry.get("tensors")
    ok = isinstance(tensors, dict) and all(
        isinstance(v, dict) and isinstance(v.get("shape"), list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v["shape"])
        and isinstance(getattr(torch, str(v.get("dtype")), None), torch.dtype)
        for v in tensors.values()
    )
    if not ok:
        raise ValueError(f"{where}: field `tensors` should map each tensor name to its `shape` and `dtype`, got {tensors!r:.200}.")


def _check_copy_layout(entry: dict, name: str, info, tensors_path: Path, sidecar_path: Path) -> None:
    spec = entry["tensors"][name.removeprefix("copy.")]
    dtype = getattr(torch, spec["dtype"])
    if tuple(info.shape) != tuple(spec["shape"]) or info.dtype != dtype:
        raise ValueError(
            f"`{tensors_path}`: tensor `{entry['module_path']}.{name}` is {tuple(info.shape)} "
            f"{info.dtype}, but `{sidecar_path}` says {tuple(spec['shape'])} {dtype}. The two files do not belong together."
        )


def _resolve_modules(saved: list, model: "Envoy", directory: Path) -> list["Envoy"]:
    """The model's Envoy at each saved path; an error listing every path the model lacks."""
    names = {name for name, _ in model._module.named_modules() if name}
    missing = [one.module_path for one in saved if one.module_path not in names]
    if missing:
        shown = ", ".join(sorted(names)[:4])
        raise ValueError(
            f"The set in `{directory}` has adapters on {len(missing)} module(s) this model does not "
            f"have, e.g. `{missing[0]}`. Its modules are named like {shown}, ... Load the set onto "
            f"the model it was trained on (or one of the same architecture), passing the model itself."
        )
    return [envoy_at(model, one.module_path) for one in saved]


def _relative(path: str, root_path: str) -> str:
    """A set key (an nnsight path, ``model.transformer...``) as a path inside the model."""
    return path[len(root_path) + 1 :] if path.startswith(root_path + ".") else path


def _single_hint(directory: Path) -> str:
    """Point at `LORA.load` when ``directory`` holds one saved adapter rather than a set."""
    if (directory / "lora.json").is_file():
        return "It holds one saved adapter (`lora.json`): load it with `LORA.load(directory, module)`."
    return _HINT
