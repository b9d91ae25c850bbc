"""Any intervention (and a mix of them) in this package's own checked format.

One intervention is a directory::

    <directory>/
        intervention.safetensors   its `state_dict()` (LoReFT: pyreft's keys)
        intervention.json          the type (``"LoReFT"``), its constructor options,
                                   the module path it was trained on, training mode,
                                   the tensors' shapes, format and package versions,
                                   and the tensor file's SHA-256

An `InterventionSet` is one directory with ``interventions.safetensors`` (keys
``"<index>.<name>"``, in the set's order) and ``interventions.json`` (the same
fields per intervention, module paths relative to the model).

The machinery is `files` and `native`'s, shared with `LORA`'s format:
``replace_directory`` (the directory is replaced as a whole), JSON and
safetensors only (never pickle), the header checked against what the sidecar
says before any data is read, then the checksum, then finite values.

Compatibility: ``format_version`` is 1 for both; a newer file is refused with
a message to upgrade.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..optim.dims import infer_dims
from ..optim.paths import envoy_at
from .files import check_finite, read_header, read_json, replace_directory, require_directory, require_file, saved_directory, sha256_hex, tensor_bytes
from .native import check_format, read_checked_tensors

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

    from ..optim.intervention_set import InterventionSet

__all__ = ["FORMAT", "SET_FORMAT", "save_intervention", "load_intervention", "save_intervention_set", "load_intervention_set"]

FORMAT = "nnsight-toolbox/intervention"
SET_FORMAT = "nnsight-toolbox/intervention-set"
#: The version this package writes. Readers accept every version up to it.
FORMAT_VERSION = 1
TENSORS_FILE, SIDECAR_FILE = "intervention.safetensors", "intervention.json"
SET_TENSORS_FILE, SET_SIDECAR_FILE = "interventions.safetensors", "interventions.json"


def intervention_types() -> dict[str, type]:
    """The types a sidecar may name, by class name."""
    from ..optim.direft import DiReFT
    from ..optim.lora import LORA
    from ..optim.loreft import LoReFT
    from ..optim.soft_prompt import SoftPrompt
    from ..optim.steering import SteeringVector

    return {cls.__name__: cls for cls in (LORA, SteeringVector, SoftPrompt, LoReFT, DiReFT)}


def config_of(obj: Any) -> dict[str, Any]:
    """An intervention's constructor options as JSON values; `LORA` has no `config` method, so it is read here."""
    from ..optim.lora import LORA

    if isinstance(obj, LORA):
        return {
            "r": obj.r,
            "dropout": obj.dropout,
            "dtype": str(obj.WA.dtype).removeprefix("torch."),
            "input_dim": obj.input_dim,
            "output_dim": obj.output_dim,
        }
    return obj.config()


def entry_of(obj: Any, module_path: str) -> dict[str, Any]:
    """What a sidecar records of one intervention."""
    type_name = type(obj).__name__
    if intervention_types().get(type_name) is not type(obj):
        raise TypeError(
            f"Cannot save a `{type_name}`: this format holds {sorted(intervention_types())}. "
            f"Save its tensors with `torch.save(obj.state_dict(), path)` instead."
        )
    return {
        "type": type_name,
        "module_path": module_path,
        "module_type": type(obj.module._module).__name__,
        "config": config_of(obj),
        "training": obj.training,
        "tensors": {k: list(v.shape) for k, v in obj.state_dict().items()},
    }


def save_intervention(obj: Any, directory: str | os.PathLike) -> Path:
    """Write one intervention to ``directory`` (replaced as a whole).

    Examples:
        >>> from nnsight_toolbox import LoReFT
        >>> save_intervention(LoReFT(model.transformer.h[0], r=4), "reft")
        PosixPath('reft')
    """
    from .. import __version__

    entry = entry_of(obj, obj.module.path)
    data = tensor_bytes(dict(obj.state_dict()))
    sidecar = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__, **entry, "sha256": sha256_hex(data)}
    files = {TENSORS_FILE: data, SIDECAR_FILE: (json.dumps(sidecar, indent=2) + "\n").encode()}
    return replace_directory(directory, files, f"`{type(obj).__name__.lower()}.save`")


def load_intervention(directory: str | os.PathLike, module: "Envoy", cls: type | None = None) -> Any:
    """A new intervention on ``module`` from ``directory``; with ``cls``, the saved type must be it.

    Examples:
        >>> from nnsight_toolbox import LoReFT
        >>> save_intervention(LoReFT(model.transformer.h[0], r=4), "reft")
        PosixPath('reft')
        >>> load_intervention("reft", model.transformer.h[1]).path
        'model.transformer.h.1'
    """
    directory = saved_directory(directory)
    hint = "Save one there with `intervention.save(directory)`."
    directory = require_directory(directory, "a saved intervention (`intervention.json` and `intervention.safetensors`)", hint)
    sidecar_path = require_file(directory / SIDECAR_FILE, "the intervention's JSON sidecar", hint)
    tensors_path = require_file(directory / TENSORS_FILE, "the intervention's tensors", hint)
    sidecar = read_json(sidecar_path)
    check_format(sidecar, sidecar_path, FORMAT, FORMAT_VERSION, "For a LoRA saved by `lora.save` use `LORA.load`.")
    where = f"`{sidecar_path}`"
    if cls is not None and sidecar.get("type") != cls.__name__:
        raise ValueError(
            f"{where} holds a saved {sidecar.get('type')!r}, not a `{cls.__name__}`. Load it with "
            f"`{sidecar.get('type')}.load(directory, module)`."
        )
    obj = build(sidecar, module, where)
    header = read_header(tensors_path, allow_short=True)  # names, shapes, dtypes before any data
    check_tensors(obj, header, "", tensors_path, where)
    tensors = read_checked_tensors(tensors_path, sidecar_path, _sha(sidecar, where))
    return fill(obj, tensors, "", sidecar, tensors_path)


def save_intervention_set(interventions: "InterventionSet", directory: str | os.PathLike) -> Path:
    """Write every intervention of the set, in order, to one directory (replaced as a whole).

    Examples:
        >>> from nnsight_toolbox import InterventionSet, SteeringVector
        >>> save_intervention_set(InterventionSet([SteeringVector(model.transformer.h[0])]), "mix")
        PosixPath('mix')
    """
    from .. import __version__

    entries, tensors = [], {}
    for i, obj in enumerate(interventions):
        entries.append(entry_of(obj, _relative(obj.module.path, interventions.root_path)))
        tensors.update({f"{i}.{k}": v for k, v in obj.state_dict().items()})
    data = tensor_bytes(tensors)
    sidecar = {
        "format": SET_FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "interventions": entries,
        "sha256": sha256_hex(data),
    }
    files = {SET_TENSORS_FILE: data, SET_SIDECAR_FILE: (json.dumps(sidecar, indent=2) + "\n").encode()}
    return replace_directory(directory, files, "`interventions.save`")


def load_intervention_set(directory: str | os.PathLike, model: "Envoy", cls: type | None = None) -> "InterventionSet":
    """A new set on ``model``'s modules at the saved paths; everything is checked before it is returned.

    Examples:
        >>> from nnsight_toolbox import InterventionSet, SteeringVector
        >>> save_intervention_set(InterventionSet([SteeringVector(model.transformer.h[0])]), "mix")
        PosixPath('mix')
        >>> [obj.path for obj in load_intervention_set("mix", model)]
        ['model.transformer.h.0']
    """
    from ..optim.intervention_set import InterventionSet

    if model.root is not model:
        raise ValueError(
            f"`InterventionSet.load` needs the whole model (a saved set names its modules from the "
            f"model's root); got the module `{model.path}`. Pass `model` itself."
        )
    directory = saved_directory(directory)
    hint = "Save a set there with `interventions.save(directory)`."
    directory = require_directory(directory, "a saved `InterventionSet` (`interventions.json` and `interventions.safetensors`)", hint)
    sidecar_path = require_file(directory / SET_SIDECAR_FILE, "the set's JSON sidecar", hint)
    tensors_path = require_file(directory / SET_TENSORS_FILE, "the set's tensors", hint)
    sidecar = read_json(sidecar_path)
    check_format(sidecar, sidecar_path, SET_FORMAT, FORMAT_VERSION, "For one intervention use its class's `load`.")
    entries = sidecar.get("interventions")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"`{sidecar_path}`: field `interventions` should be a non-empty list, got {entries!r}.")
    names = {name for name, _ in model._module.named_modules() if name}
    objects = []
    for i, entry in enumerate(entries):
        where = f"`{sidecar_path}`, intervention {i}"
        path = entry.get("module_path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or path not in names:
            raise ValueError(f"{where}: the model has no module {path!r}. Load the set onto the model it was trained on.")
        objects.append(build(entry, envoy_at(model, path), where))
    header = read_header(tensors_path, allow_short=True)
    expected = {f"{i}.{k}" for i, obj in enumerate(objects) for k in obj.state_dict()}
    if set(header) != expected:
        missing, extra = sorted(expected - set(header)), sorted(set(header) - expected)
        raise ValueError(
            f"`{tensors_path}` does not hold the tensors `{sidecar_path}` lists: missing "
            f"{missing[:4] or 'none'}, unexpected {extra[:4] or 'none'}. The two files do not belong together."
        )
    for i, obj in enumerate(objects):
        check_tensors(obj, header, f"{i}.", tensors_path, f"`{sidecar_path}`, intervention {i}")
    tensors = read_checked_tensors(tensors_path, sidecar_path, _sha(sidecar, f"`{sidecar_path}`"))
    built = [fill(obj, tensors, f"{i}.", entry, tensors_path) for i, (obj, entry) in enumerate(zip(objects, entries))]
    return (InterventionSet if cls is None else cls)(built)


def build(entry: Any, module: "Envoy", where: str) -> Any:
    """A fresh intervention of the entry's type and options on ``module``, its width checked."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an intervention's entry should be a JSON object, got {entry!r}.")
    types = intervention_types()
    cls = types.get(entry.get("type"))
    if cls is None:
        raise ValueError(f"{where}: field `type` is {entry.get('type')!r}; this version reads {sorted(types)}. Upgrade nnsight-toolbox if it is newer.")
    config = entry.get("config")
    if not isinstance(config, dict) or not isinstance(entry.get("training"), bool):
        raise ValueError(f"{where}: fields `config` (an object) and `training` (a bool) are required, got {config!r} and {entry.get('training')!r}.")
    options = dict(config)
    dtype = getattr(torch, str(options.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: `config.dtype` should name a torch dtype, got {options.get('dtype')!r}.")
    options["dtype"] = dtype
    positional = [options.pop(name) for name in ("r", "n") if name in options]
    try:
        obj = cls(module, *positional, **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: the saved options {config} do not build a `{cls.__name__}`: {error}") from error
    dims = infer_dims(module)
    if config.get("output_dim") != dims.output_dim or config.get("input_dim", dims.input_dim) != dims.input_dim:
        saved = {k: config.get(k) for k in ("input_dim", "output_dim") if k in config}
        raise ValueError(
            f"{where}: the `{cls.__name__}` was trained on `{entry.get('module_path')}` with {saved}, but "
            f"`{module.path}` ({type(module._module).__name__}) has input_dim={dims.input_dim}, "
            f"output_dim={dims.output_dim}. Load it onto a module of the same widths."
        )
    return obj


def check_tensors(obj: Any, header: dict, prefix: str, tensors_path: Path, where: str) -> None:
    """The file's tensors must be the ones a fresh ``obj`` has: names, shapes and dtypes."""
    for key, value in obj.state_dict().items():
        info = header.get(prefix + key)
        if info is None:
            raise ValueError(f"`{tensors_path}` lacks tensor `{prefix + key}`, which {where} needs. The two files do not belong together.")
        if tuple(info.shape) != tuple(value.shape) or info.dtype != value.dtype:
            raise ValueError(
                f"`{tensors_path}`: tensor `{prefix + key}` is {info.code} {tuple(info.shape)}, but {where} "
                f"describes a `{type(obj).__name__}` whose `{key}` is {value.dtype} {tuple(value.shape)}."
            )
    extra = sorted(k for k in header if k.startswith(prefix) and k[len(prefix):] not in obj.state_dict()) if prefix == "" else []
    if extra:
        raise ValueError(f"`{tensors_path}` holds tensors a `{type(obj).__name__}` does not have: {extra[:4]}.")


def fill(obj: Any, tensors: dict[str, torch.Tensor], prefix: str, entry: dict, tensors_path: Path) -> Any:
    """``obj`` with the checked tensors loaded and the saved training mode."""
    state = {}
    for key in obj.state_dict():
        check_finite(tensors[prefix + key], prefix + key, tensors_path)
        state[key] = tensors[prefix + key]
    obj.load_state_dict(state)
    obj.train(entry["training"])
    return obj


def _sha(sidecar: dict, where: str) -> str:
    if not isinstance(sidecar.get("sha256"), str):
        raise ValueError(f"{where}: field `sha256` should be a str, got {sidecar.get('sha256')!r}.")
    return sidecar["sha256"]


def _relative(path: str, root_path: str) -> str:
    return path[len(root_path) + 1 :] if path.startswith(root_path + ".") else path
