"""This package's own adapter format: a safetensors file and a JSON sidecar.

A saved adapter is a directory::

    <directory>/
        lora.safetensors   WA (input_dim, r) and WB (r, output_dim), in the adapter's dtype;
                           also bias (output_dim,) with ``bias=True``, and magnitude
                           (output_dim,) for a `DoRA` adapter
        lora.json          its type (LORA or DoRA), whether it has a bias,
                           r, widths, dtype, dropout, the module path it was trained on,
                           the package version, the format version, and the tensor
                           file's SHA-256

Any module an adapter can sit on saves, blocks and decoder layers included
(PEFT's format takes only Linear, Conv1D and Embedding layers; see
`nnsight_toolbox.artifacts.peft_format`). Loading reads JSON and safetensors
only, never pickle, and checks everything (files, checksum, keys, shapes,
dtypes, finite values, the target's widths) before it builds the adapter.

A whole `LoraSet` saves to one directory in the sibling format of
`nnsight_toolbox.artifacts.native_set`, which records the same fields per adapter.

Compatibility: a plain `LORA` without a bias is written as ``format_version``
1, which every version of this package reads; a `DoRA` or a biased adapter as
version 2, which records ``type`` and ``bias`` and the extra tensors, so an
older version refuses it with a message to upgrade rather than misreading it.
Version 1 files read as a plain `LORA` without a bias. Later versions of this package keep
reading every version up to their own; a file from a newer version is refused
with a message to upgrade.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..optim.dims import infer_dims
from .files import (
    check_finite,
    is_number,
    read_header,
    read_json,
    read_tensors,
    replace_directory,
    require_directory,
    require_file,
    saved_directory,
    sha256_hex,
    tensor_bytes,
)

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

    from ..optim.lora import LORA

__all__ = ["FORMAT", "FORMAT_VERSION", "TENSORS_FILE", "SIDECAR_FILE", "save_lora", "load_lora"]

FORMAT = "nnsight-toolbox/lora"
#: The newest version this package writes (for a DoRA or biased adapter; a plain one
#: is still written as 1). Readers accept every version up to it.
FORMAT_VERSION = 2
TENSORS_FILE = "lora.safetensors"
SIDECAR_FILE = "lora.json"

_HINT = "Save an adapter there with `lora.save(directory)`."


@dataclass(frozen=True)
class SavedLora:
    """A validated saved adapter, not yet placed on a module."""

    r: int
    input_dim: int
    output_dim: int
    takes_ids: bool
    dropout: float
    training: bool
    module_path: str
    WA: torch.Tensor  # (input_dim, r)
    WB: torch.Tensor  # (r, output_dim)
    kind: str = "LORA"  # or "DoRA"
    bias: torch.Tensor | None = None  # (output_dim,)
    magnitude: torch.Tensor | None = None  # (output_dim,), DoRA only


def save_lora(lora: "LORA", directory: str | os.PathLike) -> Path:
    """Write ``lora`` to ``directory`` (created if needed) as ``lora.safetensors`` + ``lora.json``.

    The directory is replaced as a whole (`files.replace_directory`): if the save
    is interrupted at any point, it loads as the complete old adapter or the
    complete new one. Other files in it are kept.

    Examples:
        >>> save_lora(lora, "adapters/mlp")
        PosixPath('adapters/mlp')
    """
    from .. import __version__

    tensors = adapter_tensors(lora)
    data = tensor_bytes(tensors)
    sidecar = {
        "format": FORMAT,
        "format_version": format_version([lora]),
        "package_version": __version__,
        **adapter_fields(lora, lora.path),
        "tensors": {name: list(tensor.shape) for name, tensor in tensors.items()},
        "sha256": sha256_hex(data),
    }
    files = {TENSORS_FILE: data, SIDECAR_FILE: (json.dumps(sidecar, indent=2) + "\n").encode()}
    return replace_directory(directory, files, "`lora.save`")


def load_lora(directory: str | os.PathLike, module: "Envoy", cls: type["LORA"] | None = None) -> "LORA":
    """A new adapter on ``module`` with the weights saved in ``directory``.

    ``module`` may be at another path than the one the adapter was trained on
    (the caller chose it); its widths must match the saved ones.

    Examples:
        >>> save_lora(lora, "adapters/mlp")
        PosixPath('adapters/mlp')
        >>> moved = load_lora("adapters/mlp", model.transformer.h[1].mlp)   # same widths, another layer
        >>> moved.path
        'model.transformer.h.1.mlp'
    """
    from ..optim.lora import LORA, _check_envoy

    _check_envoy(module)
    saved = read_saved_lora(directory)
    check_fits(saved, module, Path(directory))
    return build_lora(saved, module, LORA if cls is None else cls)


#: The adapter types this format saves, by the name a sidecar records in ``type``.
ADAPTER_TYPES = ("LORA", "DoRA")


def adapter_tensors(lora: "LORA") -> dict[str, torch.Tensor]:
    """The tensors one adapter saves, by name: ``WA``, ``WB``, and ``bias``/``magnitude`` if it has them."""
    tensors = {"WA": lora.WA, "WB": lora.WB}
    if lora.bias is not None:
        tensors["bias"] = lora.bias
    if getattr(lora, "magnitude", None) is not None:
        tensors["magnitude"] = lora.magnitude
    return tensors


def format_version(adapters: list) -> int:
    """1 for plain unbiased `LORA` adapters, which every version of this package reads; 2 otherwise."""
    from ..optim.lora import LORA

    plain = all(type(a) is LORA and a.bias is None for a in adapters)
    return 1 if plain else FORMAT_VERSION


def tensor_names(fields: dict[str, Any]) -> list[str]:
    """The tensors a sidecar's checked ``fields`` say the adapter has."""
    names = ["WA", "WB"]
    if fields.get("bias", False):
        names.append("bias")
    if fields.get("type", "LORA") == "DoRA":
        names.append("magnitude")
    return names


def adapter_fields(lora: "LORA", module_path: str) -> dict[str, Any]:
    """What a sidecar records of one adapter (the set format records the same per adapter)."""
    return {
        "type": "DoRA" if getattr(lora, "magnitude", None) is not None else "LORA",
        "bias": lora.bias is not None,
        "module_path": module_path,
        "module_type": type(lora.module._module).__name__,
        "r": lora.r,
        "input_dim": lora.input_dim,
        "output_dim": lora.output_dim,
        "takes_ids": lora.takes_ids,
        "dtype": _dtype_name(lora.WA.dtype),
        "dropout": lora.dropout,
        "training": lora.training,
    }


def build_lora(saved: SavedLora, module: "Envoy", cls: type["LORA"]) -> "LORA":
    """A new adapter on ``module`` holding ``saved``'s weights (already checked to fit).

    A saved `DoRA` adapter comes back as a `DoRA`, whatever ``cls`` asked for.
    """
    if saved.kind == "DoRA":
        from ..optim.dora import DoRA

        lora = DoRA(module, saved.r, dropout=saved.dropout, dtype=saved.WA.dtype)
    else:
        lora = cls(
            module,
            saved.r,
            dropout=saved.dropout,
            dtype=saved.WA.dtype,
            input_dim=saved.input_dim,
            output_dim=saved.output_dim,
            bias=saved.bias is not None,
        )
    with torch.no_grad():
        lora.WA.copy_(saved.WA)
        lora.WB.copy_(saved.WB)
        if saved.bias is not None:
            lora.bias.copy_(saved.bias)
        if saved.magnitude is not None:
            lora.magnitude.copy_(saved.magnitude)
    lora.train(saved.training)
    return lora


def read_saved_lora(directory: str | os.PathLike) -> SavedLora:
    """Read and check a saved adapter: every failure names the file at fault."""
    directory = saved_directory(directory)  # the old copy, if a save was interrupted mid-swap
    directory = require_directory(directory, "a saved adapter (`lora.json` and `lora.safetensors`)", _HINT)
    sidecar_path = require_file(directory / SIDECAR_FILE, "the adapter's JSON sidecar", _set_hint(directory))
    tensors_path = require_file(directory / TENSORS_FILE, "the adapter's tensors", _HINT)
    sidecar = read_json(sidecar_path)
    check_format(sidecar, sidecar_path, FORMAT, FORMAT_VERSION, "For a PEFT adapter use `import_peft`.")
    check_adapter_fields(sidecar, f"`{sidecar_path}`")
    if not isinstance(sidecar.get("sha256"), str):
        raise ValueError(f"`{sidecar_path}`: field `sha256` should be a str, got {sidecar.get('sha256')!r}.")
    # The header first: its names, shapes and dtypes must be the sidecar's before any data is read.
    header = read_header(tensors_path, allow_short=True)  # a short file fails the checksum below
    names = tensor_names(sidecar)
    if set(header) != set(names):
        raise ValueError(
            f"`{tensors_path}` should hold exactly the tensors {names} (`{sidecar_path}` describes a "
            f"{sidecar.get('type', 'LORA')}{' with a bias' if sidecar.get('bias') else ''}), but holds {sorted(header)}."
        )
    for name in names:
        check_layout(sidecar, name, header[name], tensors_path, sidecar_path)
    tensors = read_checked_tensors(tensors_path, sidecar_path, sidecar["sha256"])
    return saved_lora(sidecar, tensors, tensors_path, sidecar_path)


def read_checked_tensors(tensors_path: Path, sidecar_path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The tensors of ``tensors_path``, once its bytes match the checksum ``sidecar_path`` recorded.

    Call `files.read_header` first: it refuses a file larger than its header describes.
    """
    data = tensors_path.read_bytes()
    if sha256_hex(data) != sha256:
        raise ValueError(
            f"`{tensors_path}` does not match the checksum recorded in `{sidecar_path}`: "
            f"it is truncated or damaged, or belongs to another adapter. Save the adapter again."
        )
    return read_tensors(tensors_path, data)


def saved_lora(
    fields: dict[str, Any], tensors: dict[str, torch.Tensor], tensors_path: Path, sidecar_path: Path, prefix: str = ""
) -> SavedLora:
    """One adapter's checked fields and tensors as a `SavedLora`; shapes, dtypes and values checked.

    ``prefix`` is what the tensors' names carry in the file (the set format
    keys them by module path); ``tensors`` holds the file's tensors by full name.
    """
    r, input_dim, output_dim = fields["r"], fields["input_dim"], fields["output_dim"]
    own = {name: tensors[prefix + name] for name in tensor_names(fields)}
    for name, tensor in own.items():
        check_layout(fields, prefix + name, tensor, tensors_path, sidecar_path)
        check_finite(tensor, prefix + name, tensors_path)
    WA, WB = own["WA"], own["WB"]
    return SavedLora(
        r=r,
        input_dim=input_dim,
        output_dim=output_dim,
        takes_ids=fields["takes_ids"],
        dropout=float(fields["dropout"]),
        training=fields["training"],
        module_path=fields["module_path"],
        WA=WA,
        WB=WB,
        kind=fields.get("type", "LORA"),
        bias=own.get("bias"),
        magnitude=own.get("magnitude"),
    )


def check_layout(fields: dict[str, Any], name: str, tensor: Any, tensors_path: Path, sidecar_path: Path) -> None:
    """Tensor ``name`` (``...WA`` or ``...WB``; a tensor, or a `files.TensorInfo` read from the
    header) must have the shape and dtype the adapter's checked ``fields`` say."""
    r, input_dim, output_dim = fields["r"], fields["input_dim"], fields["output_dim"]
    if name.endswith("WA"):
        expected = (input_dim, r)
    elif name.endswith("WB"):
        expected = (r, output_dim)
    else:  # bias, magnitude: one number per output feature
        expected = (output_dim,)
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"`{tensors_path}`: tensor `{name}` has shape {tuple(tensor.shape)}, but "
            f"`{sidecar_path}` says r={r}, input_dim={input_dim}, output_dim={output_dim}, "
            f"so it should be {expected}. The two files do not belong together."
        )
    dtype = getattr(torch, fields["dtype"])
    if tensor.dtype != dtype:
        shown = tensor.dtype if tensor.dtype is not None else getattr(tensor, "code", "?")
        raise ValueError(f"`{tensors_path}`: tensor `{name}` is {shown}, but `{sidecar_path}` says {dtype}.")


def check_format(sidecar: dict[str, Any], path: Path, expected: str, newest: int, other_hint: str) -> None:
    """The sidecar's ``format`` must be ``expected`` and its ``format_version`` one this package reads."""
    if sidecar.get("format") != expected:
        raise ValueError(
            f"`{path}` is not a sidecar of this package's {expected!r} format (its `format` is "
            f"{sidecar.get('format')!r}). {other_hint}"
        )
    version = sidecar.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"`{path}`: `format_version` must be a positive int, got {version!r}.")
    if version > newest:
        raise ValueError(
            f"`{path}` was written in format version {version} by nnsight-toolbox "
            f"{sidecar.get('package_version', '?')}; this version reads up to format "
            f"version {newest}. Upgrade nnsight-toolbox to load it."
        )


def check_adapter_fields(fields: Any, where: str) -> None:
    """One adapter's recorded fields (see `adapter_fields`) must have the right types and ranges."""
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: an adapter's entry should be a JSON object, got {fields!r}.")
    expected = {
        "module_path": str,
        "r": int,
        "input_dim": int,
        "output_dim": int,
        "takes_ids": bool,
        "dtype": str,
        "training": bool,
    }
    for key, kind in expected.items():
        value = fields.get(key)
        wrong_bool = kind is int and isinstance(value, bool)
        if not isinstance(value, kind) or wrong_bool or (kind is int and value < 1):
            raise ValueError(
                f"{where}: field `{key}` should be a {'positive int' if kind is int else kind.__name__}, got {value!r}."
            )
    if fields.get("type", "LORA") not in ADAPTER_TYPES:
        raise ValueError(f"{where}: field `type` should be one of {list(ADAPTER_TYPES)}, got {fields.get('type')!r}.")
    if not isinstance(fields.get("bias", False), bool):
        raise ValueError(f"{where}: field `bias` should be true or false, got {fields.get('bias')!r}.")
    if fields.get("type") == "DoRA" and fields.get("bias"):
        raise ValueError(f"{where}: a DoRA adapter has no bias (PEFT refuses `lora_bias` with DoRA too), but `bias` is true.")
    if not is_number(fields.get("dropout")) or not 0.0 <= fields["dropout"] < 1.0:
        raise ValueError(f"{where}: field `dropout` should be a number in [0, 1), got {fields.get('dropout')!r}.")
    from ..optim.lora import ADAPTER_DTYPES

    dtype = getattr(torch, fields["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{where}: field `dtype` should name a floating torch dtype, got {fields['dtype']!r}.")
    if dtype not in ADAPTER_DTYPES:
        raise ValueError(
            f"{where}: field `dtype` is {fields['dtype']!r}, which torch cannot train or multiply "
            f"with; an adapter is one of {', '.join(_dtype_name(d) for d in ADAPTER_DTYPES)}. "
            f"The file was not written by `lora.save`; write it again from the adapter."
        )


def _set_hint(directory: Path) -> str:
    """Point at `LoraSet.load` when ``directory`` holds a saved set rather than one adapter."""
    if (directory / "lora_set.json").is_file():
        return "It holds a saved `LoraSet` (`lora_set.json`): load it with `LoraSet.load(directory, model)`."
    return _HINT


def check_fits(saved: SavedLora, module: "Envoy", directory: Path) -> None:
    """The saved widths must be the module's; its path may differ (the caller chose it)."""
    dims = infer_dims(module)
    saved_shape = (saved.input_dim, saved.output_dim)
    module_shape = (dims.input_dim, dims.output_dim)
    if saved_shape != module_shape or saved.takes_ids != dims.takes_ids:
        what = lambda ids: "token ids" if ids else "activations"  # noqa: E731
        raise ValueError(
            f"The adapter in `{directory}` was trained on `{saved.module_path}` with "
            f"(input_dim, output_dim) = {saved_shape} on {what(saved.takes_ids)}, but "
            f"`{module.path}` ({type(module._module).__name__}) has {module_shape} on "
            f"{what(dims.takes_ids)}. Load it onto a module of the same shape."
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
