"""This package's own file format, for one intervention or a whole collection.

A saved directory holds two files::

    <directory>/
        interventions.safetensors   "<i>.<name>": the `state_dict()` tensors of entry i
        interventions.json          format, format_version, package_version, the tensor
                                    file's SHA-256, and one entry per intervention:
                                    {kind, module_path, module_type, config, training,
                                     metadata, tensors: {name: {shape, dtype}}}

``kind`` is the class name (`nnsight_toolbox.optim.kinds`), ``config`` what
``kind.config()`` returned, and ``module_path`` the module's path inside the model
(``transformer.h.0.mlp``, as in a Hugging Face ``state_dict``), so a collection
loads onto any nnsight wrapper of the same architecture. One intervention is a
collection of one: `ModuleIntervention.save` and `InterventionSet.save` write
the same format.

One reader serves every kind, the user's own included, and touches nothing
before it has checked everything:

1. the sidecar: format, version, and each entry's fields;
2. for each entry, ``kind._build_for_load(module, config)``, i.e.
   ``kind(module, **config)``: a fresh object, which also checks the options;
   then the saved widths against the module's;
3. the tensor file's header (names, shapes, dtypes) against the fresh objects'
   ``state_dict()``, before any data is read; then the checksum; then finite values;
4. only then the tensors go into the objects (`load_state_dict`).

A save goes through `files.replace_directory`, so it replaces the whole
directory at once.

Earlier formats load through the same steps: their sidecars are read into the
same entries. They are ``lora.json`` (`LORA`/`DoRA`, versions 1 and 2),
``lora_set.json`` (a `LoraSet`, versions 1 and 2), ``intervention.json`` and
``interventions.json`` version 1. A directory holding several sidecars loads
from the newest format (a save keeps other files, so an old sidecar may remain).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..optim.dims import infer_dims
from ..optim.kinds import KINDS, kind_named
from ..optim.paths import envoy_at
from .files import (
    check_finite,
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

__all__ = ["FORMAT", "FORMAT_VERSION", "TENSORS_FILE", "SIDECAR_FILE", "save_interventions", "load_one", "load_many"]

FORMAT = "nnsight-toolbox/intervention-set"
#: The version this package writes. Readers accept every version up to it.
FORMAT_VERSION = 2
TENSORS_FILE, SIDECAR_FILE = "interventions.safetensors", "interventions.json"

#: Sidecars of earlier formats, newest first: (sidecar, tensor file, format name, newest version).
EARLIER = (
    ("lora_set.json", "lora_set.safetensors", "nnsight-toolbox/lora-set", 2),
    ("lora.json", "lora.safetensors", "nnsight-toolbox/lora", 2),
    ("intervention.json", "intervention.safetensors", "nnsight-toolbox/intervention", 1),
)

_HINT = "Save one there with `intervention.save(directory)` (or `interventions.save(directory)` for a set)."


class Entry:
    """One intervention as a sidecar describes it, whatever the format's version.

    A plain class, as `nnsight_toolbox.optim.dims.ModuleDims` is (remote servers
    rebuild this package from source).
    """

    __slots__ = ("kind", "module_path", "config", "training", "metadata", "prefix")

    def __init__(self, kind: str, module_path: str, config: dict, training: bool, metadata: dict, prefix: str) -> None:
        self.kind = kind  # a class name
        self.module_path = module_path  # inside the model, or (earlier single files) the nnsight path
        self.config = config  # the constructor's keyword arguments
        self.training = training
        self.metadata = metadata
        self.prefix = prefix  # what its tensors' names carry in the file


class Saved:
    """A read sidecar: its entries and where its files are."""

    __slots__ = ("entries", "sidecar_path", "tensors_path", "sha256", "is_single_file")

    def __init__(self, entries: list[Entry], sidecar_path: Path, tensors_path: Path, sha256: str, is_single_file: bool) -> None:
        self.entries = entries
        self.sidecar_path = sidecar_path
        self.tensors_path = tensors_path
        self.sha256 = sha256
        self.is_single_file = is_single_file  # `lora.json` or `intervention.json`, whose path is the nnsight one


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def save_interventions(members: list, directory: str | os.PathLike, root_path: str, what: str) -> Path:
    """Write ``members`` (interventions of one model, in order) to ``directory``, replaced as a whole.

    ``root_path`` is the model root's nnsight path (``"model"``), which module
    paths are written relative to; ``what`` names the call, for errors.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> save_interventions([SteeringVector(model.transformer.h[0])], "steer", "model", "`SteeringVector.save`")
        PosixPath('steer')
    """
    entries, tensors = [], {}
    for i, obj in enumerate(members):
        entry, state = entry_of(obj, relative_path(obj.module.path, root_path), what)
        entries.append(entry)
        tensors.update({f"{i}.{name}": tensor for name, tensor in state.items()})
    data = tensor_bytes(tensors)
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "interventions": entries,
        "sha256": sha256_hex(data),
    }
    files = {TENSORS_FILE: data, SIDECAR_FILE: (json.dumps(sidecar, indent=2) + "\n").encode()}
    return replace_directory(directory, files, what)


def entry_of(obj: Any, module_path: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What the sidecar records of one intervention, and its tensors by name."""
    name = type(obj).__name__
    config, metadata = getattr(obj, "config", None), getattr(obj, "metadata", None)
    if name not in KINDS or not callable(config) or not isinstance(metadata, dict):
        raise TypeError(
            f"{what} cannot save a `{name}`: the format holds kinds of intervention on a module, "
            f"subclasses of `ModuleIntervention` (which records its options in `config()`). "
            f"Save its tensors with `safetensors.torch.save_file(obj.state_dict(), path)` instead."
        )
    config = config()
    for value, where in ((config, f"`{name}.config()`"), (metadata, f"`{name}.metadata`")):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{what}: {where} must hold JSON values (str, number, bool, None, and lists and "
                f"dicts of them), so the format can record it: {error}."
            ) from None
    state = {key: value.detach() for key, value in obj.state_dict().items()}
    entry = {
        "kind": name,
        "module_path": module_path,
        "module_type": type(obj.module._module).__name__,
        "config": config,
        "training": obj.training,
        "metadata": metadata,
        "tensors": {key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for key, t in state.items()},
    }
    return entry, state


def relative_path(path: str, root_path: str) -> str:
    """An nnsight path (``model.transformer.h.0``) as a path inside the model (``transformer.h.0``)."""
    return path[len(root_path) + 1 :] if path.startswith(root_path + ".") else path


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def load_one(directory: str | os.PathLike, module: "Envoy", cls: type) -> Any:
    """The one intervention saved in ``directory``, built on ``module``; its kind must be ``cls`` or a subclass.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> SteeringVector(model.transformer.h[0]).save("steer")
        >>> load_one("steer", model.transformer.h[1], SteeringVector).path
        'model.transformer.h.1'
    """
    saved = read_saved(directory)
    where = f"`{saved.sidecar_path}`"
    if len(saved.entries) != 1:
        raise ValueError(
            f"{where} holds a collection of {len(saved.entries)} interventions, not one. Load it with "
            f"`InterventionSet.load(directory, model)` (or `LoraSet.load` for adapters)."
        )
    entry = saved.entries[0]
    kind = kind_named(entry.kind, where)
    if not issubclass(kind, cls):
        raise ValueError(
            f"{where} holds a saved `{entry.kind}`, which is not a `{cls.__name__}`. Load it with "
            f"`{entry.kind}.load(directory, module)` (or `ModuleIntervention.load` for any kind)."
        )
    return _build_and_fill(saved, [(entry, module, module.path)])[0]


def load_many(directory: str | os.PathLike, model: "Envoy", what: str) -> list:
    """Every intervention saved in ``directory``, each on ``model``'s module at its saved path.

    Examples:
        >>> from nnsight_toolbox import InterventionSet, SteeringVector
        >>> InterventionSet([SteeringVector(model.transformer.h[0])]).save("mix")
        >>> [obj.path for obj in load_many("mix", model, "`InterventionSet.load`")]
        ['model.transformer.h.0']
    """
    if model.root is not model:
        raise ValueError(
            f"{what} needs the whole model, since a saved collection names its modules from the "
            f"model's root; got the module `{model.path}`. Pass `model` itself."
        )
    saved = read_saved(directory)
    names = {name for name, _ in model._module.named_modules() if name}
    placed, missing = [], []
    for entry in saved.entries:
        # Earlier single-intervention files recorded the nnsight path (`model.transformer.h.0`).
        path = relative_path(entry.module_path, model.path) if saved.is_single_file else entry.module_path
        if path not in names:
            missing.append(f"{model.path}.{path}")
            continue
        placed.append((entry, envoy_at(model, path), f"{model.path}.{path}"))
    if missing:
        shown = ", ".join(f"`{model.path}.{n}`" for n in sorted(names)[:4])
        raise ValueError(
            f"`{saved.sidecar_path}` has interventions on {len(missing)} module(s) this model does not have, "
            f"e.g. `{missing[0]}`. Its modules are named like {shown}, ... Load it onto the model it was "
            f"trained on (or one of the same architecture), passing the model itself."
        )
    return _build_and_fill(saved, placed)


def _build_and_fill(saved: Saved, placed: list[tuple[Entry, "Envoy", str]]) -> list:
    """Fresh objects for the entries, every file checked against them, then filled; or an error and nothing built."""
    objects = [_build(entry, module, shown, f"`{saved.sidecar_path}`, {entry.kind} on `{shown}`") for entry, module, shown in placed]
    header = read_header(saved.tensors_path, allow_short=True)  # names, shapes and dtypes before any data
    expected: dict[str, tuple[Any, str]] = {}
    for obj, (entry, _, shown) in zip(objects, placed):
        for key, value in obj.state_dict().items():
            expected[entry.prefix + key] = (value, f"the {entry.kind} on `{shown}`")
    if set(header) != set(expected):
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        raise ValueError(
            f"`{saved.tensors_path}` does not hold the tensors `{saved.sidecar_path}` describes: missing "
            f"{missing[:4] or 'none'}, unexpected {extra[:4] or 'none'}. The two files do not belong together."
        )
    for name, (value, whose) in expected.items():
        info = header[name]
        if tuple(info.shape) != tuple(value.shape) or info.dtype != value.dtype:
            shown = info.dtype if info.dtype is not None else info.code
            raise ValueError(
                f"`{saved.tensors_path}`: tensor `{name}` is {shown} {tuple(info.shape)}, but {whose} "
                f"(as `{saved.sidecar_path}` describes it) needs {value.dtype} {tuple(value.shape)}. "
                f"The two files do not belong together."
            )
    data = saved.tensors_path.read_bytes()
    if sha256_hex(data) != saved.sha256:
        raise ValueError(
            f"`{saved.tensors_path}` does not match the checksum recorded in `{saved.sidecar_path}`: "
            f"it is truncated or damaged, or belongs to another save. Save it again."
        )
    tensors = read_tensors(saved.tensors_path, data)
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            check_finite(tensor, name, saved.tensors_path)
    for obj, (entry, _, _) in zip(objects, placed):
        obj.load_state_dict({key: tensors[entry.prefix + key] for key in obj.state_dict()})
        obj.train(entry.training)
        obj.metadata = dict(entry.metadata)
    return objects


def _build(entry: Entry, module: "Envoy", shown: str, where: str) -> Any:
    """A fresh intervention of the entry's kind and options on ``module``, its widths checked."""
    kind = kind_named(entry.kind, where)
    try:
        obj = kind._build_for_load(module, entry.config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: the saved options {entry.config} do not build a `{entry.kind}` there: {error}") from error
    widths = {k: entry.config[k] for k in ("input_dim", "output_dim") if k in entry.config}
    if widths:
        try:
            dims = infer_dims(module)
        except (TypeError, ValueError):
            dims = None  # widths only the user knew: the intervention's own shape checks guard each call
        if dims is not None and any(getattr(dims, k) != v for k, v in widths.items()):
            raise ValueError(
                f"{where}: it was saved with {widths}, but `{shown}` ({type(module._module).__name__}) has "
                f"input_dim={dims.input_dim}, output_dim={dims.output_dim}. Load it onto a module of the same widths."
            )
    return obj


def read_saved(directory: str | os.PathLike) -> Saved:
    """Read and check a saved directory's sidecar, of any version: every failure names the file at fault."""
    directory = saved_directory(directory)  # the old copy, if a save was interrupted mid-swap
    directory = require_directory(directory, "a saved intervention (`interventions.json` and `interventions.safetensors`)", _HINT)
    for sidecar_name, tensors_name, format_name, newest in ((SIDECAR_FILE, TENSORS_FILE, FORMAT, FORMAT_VERSION), *EARLIER):
        if (directory / sidecar_name).is_file():
            break
    else:
        raise FileNotFoundError(
            f"`{directory}` holds no saved intervention: it has no `{SIDECAR_FILE}` (nor a `lora.json`, "
            f"`lora_set.json` or `intervention.json` of earlier versions). {_HINT} For a PEFT adapter "
            f"use `import_peft`."
        )
    sidecar_path = directory / sidecar_name
    tensors_path = require_file(directory / tensors_name, "the saved tensors", _HINT)
    sidecar = read_json(sidecar_path)
    check_format(sidecar, sidecar_path, format_name, newest, "For a PEFT adapter use `import_peft`.")
    where = f"`{sidecar_path}`"
    if not isinstance(sidecar.get("sha256"), str):
        raise ValueError(f"{where}: field `sha256` should be a str, got {sidecar.get('sha256')!r}.")
    if format_name == "nnsight-toolbox/lora":
        entries, single = [_lora_entry(sidecar, where, "")], True
    elif format_name == "nnsight-toolbox/intervention":
        entries, single = [_entry(sidecar, where, "")], True
    else:
        key = "adapters" if format_name == "nnsight-toolbox/lora-set" else "interventions"
        listed = sidecar.get(key)
        if not isinstance(listed, list) or not listed:
            raise ValueError(f"{where}: field `{key}` should be a non-empty list, got {listed!r:.200}.")
        if key == "adapters":  # tensors keyed by module path
            entries = [_lora_set_entry(item, f"{where}, entry {i}") for i, item in enumerate(listed)]
        else:
            entries = [_entry(item, f"{where}, entry {i}", f"{i}.") for i, item in enumerate(listed)]
        single = False
    return Saved(entries, sidecar_path, tensors_path, sidecar["sha256"], single)


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


def _entry(item: Any, where: str, prefix: str) -> Entry:
    """An entry of this format (``kind``) or of ``intervention.json``/``interventions.json`` version 1 (``type``)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: an intervention's entry should be a JSON object, got {item!r:.200}.")
    kind = item.get("kind", item.get("type"))
    config, training, metadata = item.get("config"), item.get("training"), item.get("metadata", {})
    path = item.get("module_path")
    if not isinstance(kind, str) or not isinstance(path, str) or not isinstance(config, dict) or not isinstance(training, bool) or not isinstance(metadata, dict):
        raise ValueError(
            f"{where}: an entry needs `kind` (a str), `module_path` (a str), `config` (an object), "
            f"`training` (true or false) and, optionally, `metadata` (an object); got {item!r:.300}."
        )
    return Entry(kind, path, config, training, metadata, prefix)


def _lora_entry(fields: Any, where: str, prefix: str) -> Entry:
    """An adapter of ``lora.json`` (or of ``lora_set.json``'s list): its fields are the constructor's."""
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: an adapter's entry should be a JSON object, got {fields!r:.200}.")
    kind = fields.get("type", "LORA")
    for key, expected in (("module_path", str), ("training", bool), ("r", int), ("input_dim", int), ("output_dim", int), ("dtype", str)):
        value = fields.get(key)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{where}: field `{key}` should be a {expected.__name__}, got {value!r}.")
    config = {k: fields[k] for k in ("r", "dropout", "dtype", "input_dim", "output_dim") if k in fields}
    if fields.get("bias", False) is not False:
        config["bias"] = fields["bias"]  # only a `LORA` takes it: a DoRA entry with a bias is refused when built
    return Entry(kind, fields["module_path"], config, fields["training"], {}, prefix)


def _lora_set_entry(fields: Any, where: str) -> Entry:
    """An entry of ``lora_set.json``: an adapter, or a `ModuleCopy` (whose tensors the file keys ``<path>.copy.<name>``)."""
    if isinstance(fields, dict) and fields.get("type") == "ModuleCopy":
        path, training = fields.get("module_path"), fields.get("training")
        if not isinstance(path, str) or not isinstance(training, bool):
            raise ValueError(f"{where}: a `ModuleCopy` entry needs `module_path` (a str) and `training` (true or false).")
        return Entry("ModuleCopy", path, {}, training, {}, f"{path}.")
    entry = _lora_entry(fields, where, "")
    entry.prefix = f"{entry.module_path}."
    return entry
