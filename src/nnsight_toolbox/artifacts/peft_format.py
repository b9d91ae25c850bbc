"""PEFT's LoRA format: export adapters to it, import adapters from it.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained`` and
nnsight's ``TransformersModel(path, peft=directory)`` load. Its tensors are
named after the Hugging Face module they adapt, and map onto this package's
``WA (in, r)`` and ``WB (r, out)`` by a transpose::

    base_model.model.<module>.lora_A.weight      (r, in)     = WA.T      Linear, Conv1D
    base_model.model.<module>.lora_B.weight      (out, r)    = WB.T
    base_model.model.<module>.lora_embedding_A   (r, V)      = WA.T      Embedding
    base_model.model.<module>.lora_embedding_B   (dim, r)    = WB.T

PEFT scales the low-rank term by ``s = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with ``use_rslora``; Kalajdzievski 2023, arXiv:2312.03732), with
``r`` and ``lora_alpha`` overridden per module by ``rank_pattern`` and
``alpha_pattern``, whose keys are regular expressions matched against the end
of the module name (the first key that matches wins). Exporting picks
``lora_alpha = alpha * r`` so that ``s == alpha``; importing folds ``s`` into
``WB``, so ``lora()`` with the default ``alpha=1`` reproduces PEFT.

Beyond plain LoRA (and rsLoRA), three LoRA options import and export::

    use_dora=True      <module>.lora_magnitude_vector (out,)   -> `DoRA` (Linear, Conv1D)
    lora_bias=True     <module>.lora_B.bias (out,)             -> `LORA(..., bias=True)`, bias scaled like WB
    modules_to_save    <module>.<every state_dict tensor>      -> `ModuleCopy`, whose output replaces the module's

PEFT saves a ``modules_to_save`` copy under the module's own name (it strips
``modules_to_save.<adapter>.``; ``peft/utils/save_and_load.py``). Several
adapters saved together lie in one tree: the adapter named ``default`` at the
top, each other one in a subfolder of its name; ``adapter_name=`` picks one.

Any other target, or any other PEFT variant (LoHa, LoKr, IA3, VeRA, aLoRA,
``target_parameters``, prompt tuning, ...), is refused with an error that
names it and lists what is supported.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from ..optim.activation import check_alpha
from ..optim.dims import weight_dims
from ..optim.paths import envoy_at
from .files import (
    TensorInfo,
    check_finite,
    is_number,
    read_header,
    read_json,
    read_tensors,
    replace_directory,
    require_directory,
    require_file,
    saved_directory,
    tensor_bytes,
)
from .layers import describe_module, hf_name, layer_kind

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

    from ..optim.adapter_set import LoraSet
    from ..optim.lora import LORA
    from ..optim.module_copy import ModuleCopy

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "export_peft", "import_peft"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
#: PeftModel keeps the Hugging Face model at ``base_model.model``; saved keys carry that prefix.
KEY_PREFIX = "base_model.model."

#: What each saved tensor is, by the suffix after the module name: its role, and
#: whether it belongs to an embedding (``None``: either).
_PARTS = {
    "lora_A.weight": ("A", False),
    "lora_B.weight": ("B", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
    # PEFT's `save_embedding_layers="auto"` also saves the *base* weight of a targeted
    # embedding (`embed_tokens`, `lm_head`), to carry a resized vocabulary. It must be
    # the model's own weight, or the adapter alone would not reproduce PEFT.
    "base_layer.weight": ("base", None),
    "lora_B.bias": ("bias", False),  # `lora_bias=True`
    "lora_magnitude_vector": ("magnitude", None),  # DoRA's m, one per output feature
}
_KEY = re.compile(rf"^(?:{re.escape(KEY_PREFIX)})?(?P<name>.+)\.(?P<part>{'|'.join(map(re.escape, _PARTS))})$")

#: LoRA config options that make an adapter something other than plain LoRA
#: (set to anything but their default), with the name to give it.
_VARIANTS = {
    "use_qalora": "QALoRA (`use_qalora`)",
    "alora_invocation_tokens": "activated LoRA (`alora_invocation_tokens`)",
    "velora_config": "VeLoRA (`velora_config`)",
    "monteclora_config": "MonteCLoRA (`monteclora_config`)",
    "use_bdlora": "block-diagonal LoRA (`use_bdlora`)",
    "arrow_config": "Arrow routing (`arrow_config`)",
    "kasa_config": "KaSA (`kasa_config`)",
    "trainable_token_indices": "trainable tokens (`trainable_token_indices`)",
    "layer_replication": "layer replication (`layer_replication`)",
    "target_parameters": "LoRA on bare parameters (`target_parameters`)",
}
#: What `import_peft` and `export_peft` support, for error messages.
SUPPORTED = (
    "plain LoRA and rsLoRA (`use_rslora`) on `nn.Linear`, GPT-2 `Conv1D` and `nn.Embedding` layers, "
    "DoRA (`use_dora`) on Linear and Conv1D layers, LoRA with a bias on `lora_B` (`lora_bias`), "
    "and fully trained module copies (`modules_to_save`)"
)
#: ``init_lora_weights`` values that change the *base* weights when PEFT loads the
#: adapter (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or select a variant (MiCA).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")

#: What `export_peft` takes: `LORA` (and `DoRA`) adapters and `ModuleCopy` interventions.
Adapters = Union["LORA", "ModuleCopy", Mapping[str, Any], Iterable[Any]]


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def export_peft(
    loras: Adapters,
    directory: str | os.PathLike,
    *,
    alpha: float = 1.0,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapters as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

    The directory then loads with ``peft.PeftModel.from_pretrained(base, directory)``
    and with nnsight's ``TransformersModel(path, peft=directory)`` or
    ``model.load_adapter(directory)``, and computes what ``lora(alpha)`` computes
    inside a trace.

    Args:
        loras: One `LORA`, a list (any iterable) of them, or a mapping of
            path to `LORA` (a `LoraSet`), all on modules of one model. Each must
            sit on an ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding``. `DoRA`
            adapters write PEFT's ``use_dora`` (all adapters DoRA, or none),
            biased ones ``lora_bias``, and `ModuleCopy` interventions PEFT's
            ``modules_to_save`` (with ``alpha=1`` only, beside at least one adapter).
        directory: Where to write (created if needed). The directory is replaced
            as a whole: an interrupted export leaves it as the complete old
            adapter or the complete new one, never a mix (PEFT's format has no
            checksum to catch one). Other files in it are kept.
        alpha: The scale PEFT will apply, as ``lora(alpha)`` does. Written as
            ``lora_alpha = alpha * r`` (PEFT's scaling is ``lora_alpha / r``).
        base_model_name_or_path: Recorded in the config for ``AutoPeftModel``;
            by default the model's own ``config.name_or_path``.

    PEFT has one ``lora_dropout`` for all modules; the largest of the adapters'
    is written (dropout acts only in training). Adapters of different ranks
    get entries in ``rank_pattern``/``alpha_pattern`` keyed by their escaped
    full module name, which PEFT's rule matches against that module only.

    Returns:
        The directory.

    Raises:
        TypeError: A target is not a Linear, Conv1D or Embedding (use `LORA.save`),
            or ``loras`` holds something other than `LORA` objects.
        ValueError: Adapters on different models, two on one module, or NaN/Inf weights.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> c_fc = LORA(model.transformer.h[0].mlp.c_fc, r=8)
        >>> export_peft(c_fc, "peft-adapter", alpha=2.0)
        PosixPath('peft-adapter')
        >>> from peft import PeftModel
        >>> from transformers import AutoModelForCausalLM
        >>> base = AutoModelForCausalLM.from_pretrained(model.config.name_or_path)
        >>> peft_model = PeftModel.from_pretrained(base, "peft-adapter")   # computes c_fc(alpha=2.0)
    """
    from ..optim.module_copy import ModuleCopy

    adapters = _as_list(loras)
    alpha = check_alpha(alpha)
    root = adapters[0].module.root
    entries: list[tuple[str, str, "LORA"]] = []  # (HF name, layer kind, adapter)
    copies: list[tuple[str, dict[str, torch.Tensor]]] = []  # (HF name, state_dict) of each `ModuleCopy`
    seen: dict[str, str] = {}
    for lora in adapters:
        if lora.module.root is not root:
            raise ValueError(
                f"`export_peft` writes one adapter directory for one model, but the adapter on "
                f"`{lora.path}` belongs to a different model than the one on `{adapters[0].path}`. "
                f"Export each model's adapters to its own directory."
            )
        name = hf_name(lora.module)
        if name in seen:
            raise ValueError(
                f"Two adapters sit on `{lora.path}`; a PEFT adapter holds one per module. "
                f"Export them to separate directories."
            )
        if isinstance(lora, ModuleCopy):
            state = lora.copy.state_dict()
            for key, tensor in state.items():
                if tensor.is_floating_point():
                    check_finite(tensor.detach(), key, f"the copy of {lora.path}")
            seen[name] = "copy"
            copies.append((name, state))
            continue
        kind = _exportable_kind(lora)
        for part, tensor in (("WA", lora.WA), ("WB", lora.WB), ("bias", lora.bias), ("magnitude", lora.magnitude if _is_dora(lora) else None)):
            if tensor is not None:
                check_finite(tensor.detach(), part, f"the adapter on {lora.path}")
        seen[name] = kind
        entries.append((name, kind, lora))
    use_dora, lora_bias = _export_variant(entries, copies, alpha)

    tensors: dict[str, torch.Tensor] = {}
    for name, kind, lora in entries:
        a, b = ("lora_embedding_A", "lora_embedding_B") if kind == "Embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{KEY_PREFIX}{name}.{a}"] = lora.WA.detach().T  # (in, r) -> (r, in)
        tensors[f"{KEY_PREFIX}{name}.{b}"] = lora.WB.detach().T  # (r, out) -> (out, r)
        if lora_bias:  # PEFT gives every lora_B a bias then; an unbiased adapter's is zero
            bias = lora.bias.detach() if lora.bias is not None else torch.zeros(lora.output_dim, dtype=lora.WB.dtype)
            tensors[f"{KEY_PREFIX}{name}.lora_B.bias"] = bias  # PEFT scales it with lora_B: alpha * bias
        if use_dora:
            tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = lora.magnitude.detach()
    for name, state in copies:  # PEFT's layout: the module's own name, no `modules_to_save.<adapter>.`
        tensors.update({f"{KEY_PREFIX}{name}.{key}": tensor for key, tensor in state.items()})

    config = _export_config(entries, alpha, root, base_model_name_or_path)
    config.update(use_dora=use_dora, lora_bias=lora_bias, modules_to_save=[name for name, _ in copies] or None)
    files = {WEIGHTS_FILE: tensor_bytes(tensors), CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode()}
    return replace_directory(directory, files, "`export_peft`")


def _export_variant(entries: list[tuple[str, str, "LORA"]], copies: list, alpha: float) -> tuple[bool, bool]:
    """PEFT's ``use_dora`` and ``lora_bias`` for these adapters: one flag each for the whole adapter."""
    if not entries:
        raise ValueError(
            "`export_peft` was given module copies only; PEFT's LoRA format needs at least one "
            "low-rank adapter (`target_modules`) beside `modules_to_save`. Export them with the "
            "adapters they were trained with, or save them with `LoraSet([...]).save(directory)`."
        )
    if copies and alpha != 1.0:
        raise ValueError(
            f"`export_peft` got alpha={alpha} and module copies (`modules_to_save`); PEFT scales "
            f"the low-rank terms but swaps a copy in whole, so it could not compute the copies' "
            f"blend. Export with alpha=1."
        )
    dora = [name for name, _, lora in entries if _is_dora(lora)]
    if dora and len(dora) != len(entries):
        plain = next(name for name, _, lora in entries if not _is_dora(lora))
        raise ValueError(
            f"`export_peft` got DoRA adapters (e.g. on `{dora[0]}`) and plain ones (e.g. on "
            f"`{plain}`); PEFT's `use_dora` holds for every module of an adapter. Export them to "
            f"two directories."
        )
    biased = [name for name, _, lora in entries if lora.bias is not None]
    embeddings = [name for name, kind, _ in entries if kind == "Embedding"]
    if biased and embeddings:
        raise ValueError(
            f"`export_peft` got adapters with a bias (e.g. on `{biased[0]}`) and one on the "
            f"embedding `{embeddings[0]}`; PEFT's `lora_bias` gives every module a bias, and PEFT "
            f"refuses it on embeddings. Export the embedding's adapter to its own directory."
        )
    return bool(dora), bool(biased)


def _is_dora(lora: Any) -> bool:
    from ..optim.dora import DoRA

    return isinstance(lora, DoRA)


def _as_list(loras: Any) -> list["LORA"]:
    from ..optim.lora import LORA
    from ..optim.module_copy import ModuleCopy

    if isinstance(loras, (LORA, ModuleCopy)):
        adapters = [loras]
    elif isinstance(loras, Mapping):
        adapters = list(loras.values())
    elif isinstance(loras, Iterable) and not isinstance(loras, (str, bytes, torch.Tensor)):
        adapters = list(loras)
    else:
        raise TypeError(
            f"`export_peft` takes a `LORA`, a list of them, or a mapping of path to `LORA`, "
            f"got {type(loras).__name__}."
        )
    wrong = [type(a).__name__ for a in adapters if not isinstance(a, (LORA, ModuleCopy))]
    if wrong:
        raise TypeError(
            f"`export_peft` exports `LORA`, `DoRA` and `ModuleCopy` interventions only, but was "
            f"also given: {', '.join(wrong)}."
        )
    if not adapters:
        raise ValueError("`export_peft` was given no adapters; pass at least one `LORA`.")
    return adapters


def _exportable_kind(lora: "LORA") -> str:
    module = lora.module._module
    kind = layer_kind(module)
    if kind is None:
        raise TypeError(
            f"Cannot export the adapter on {describe_module(lora.module)} to PEFT: PEFT's LoRA "
            f"format adapts single layers (`nn.Linear`, GPT-2 `Conv1D`, `nn.Embedding`) through "
            f"their weight, and this module is none of those, so PEFT has no form for its adapter. "
            f"Save it in this package's format with `lora.save(directory)` and load it back with "
            f"`LORA.load(directory, module)`."
        )
    dims = weight_dims(module)
    if (dims.input_dim, dims.output_dim) != (lora.input_dim, lora.output_dim):
        raise ValueError(
            f"The adapter on `{lora.path}` has (input_dim, output_dim) = "
            f"{(lora.input_dim, lora.output_dim)}, but its {kind} has "
            f"{(dims.input_dim, dims.output_dim)}; PEFT needs the layer's own widths."
        )
    return kind


def _export_config(
    entries: list[tuple[str, str, "LORA"]], alpha: float, root: "Envoy", base_model_name_or_path: str | None
) -> dict[str, Any]:
    # The most common rank goes in `r`; the others in `rank_pattern`/`alpha_pattern`,
    # keyed by the escaped full module name so each key matches that module only.
    r = Counter(lora.r for _, _, lora in entries).most_common(1)[0][0]  # ties: the first adapter's
    rank_pattern = {re.escape(name): lora.r for name, _, lora in entries if lora.r != r}
    config_obj = getattr(root._module, "config", None)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(config_obj, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": _task_type(root._module),
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha * r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {key: alpha * rank for key, rank in rank_pattern.items()},
        "use_rslora": False,
        "target_modules": [name for name, _, _ in entries],
        # PEFT reads Conv1D weights as (in, out) when this is set; it only matters for
        # merging, and PEFT corrects it per layer when the targets mix Linear and Conv1D.
        "fan_in_fan_out": any(kind == "Conv1D" for _, kind, _ in entries),
        # PEFT has a single dropout; it acts only in training.
        "lora_dropout": max(lora.dropout for _, _, lora in entries),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def _task_type(module: torch.nn.Module) -> str | None:
    """``"CAUSAL_LM"`` for a causal LM, so that PEFT wraps it in its causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "CAUSAL_LM" if type(module).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) else None


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One adapted module, checked against the model, before any adapter is built."""

    envoy: "Envoy"
    name: str  # the Hugging Face module name
    r: int
    scale: float
    scale_source: str  # the config setting that gave the alpha, for errors
    config_path: Path
    A: torch.Tensor  # (r, in), or (r, V) for an embedding
    B: torch.Tensor  # (out, r), or (dim, r)
    bias: torch.Tensor | None = None  # (out,), with `lora_bias`
    magnitude: torch.Tensor | None = None  # (out,), DoRA's m


@dataclass(frozen=True)
class _Copy:
    """One of PEFT's `modules_to_save`, checked against the model: its whole saved state."""

    envoy: "Envoy"
    name: str
    state: dict[str, torch.Tensor]


def import_peft(
    model: Envoy, directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32, adapter_name: str | None = None
) -> LoraSet:
    """Adapters that reproduce a PEFT LoRA adapter inside nnsight traces.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (never a
    pickled ``adapter_model.bin``), checks every tensor against the model, and
    only then builds one `LORA` per adapted module. PEFT's scaling (``lora_alpha /
    r``, or ``/ sqrt(r)`` with ``use_rslora``, per module with ``rank_pattern`` and
    ``alpha_pattern``) is folded into ``WB``, so ``lora()`` with the default
    ``alpha=1`` computes what ``PeftModel`` computes. The model is not changed.

    The adapters come back in eval mode (dropout off), as PEFT loads an adapter
    for inference; call ``.train()`` on one to train it further.

    What each part of a PEFT adapter becomes:

    - a LoRA pair: a `LORA`; with ``lora_bias=True`` one with a ``bias`` (PEFT's
      ``lora_B.bias``, scaled like ``WB``);
    - with ``use_dora=True``: a `DoRA`, holding PEFT's ``lora_magnitude_vector``;
    - each of ``modules_to_save``: a `ModuleCopy` holding the saved module,
      whose output replaces the module's on the invoke's rows.

    Args:
        model: The nnsight model the adapter was trained on (its root, e.g.
            ``TransformersModel(...)``), loaded or not.
        directory: A PEFT LoRA adapter directory, written by PEFT's
            ``save_pretrained`` or by `export_peft`.
        dtype: The adapters' dtype; float32 as PEFT computes by default. A
            `ModuleCopy` keeps its module's dtype, as PEFT's copy does.
        adapter_name: Which adapter of a tree PEFT saved with several (the one
            named ``"default"`` at the top, each other in a subfolder of its
            name). Needed only when the directory holds more than one.

    A PEFT ``PROMPT_TUNING`` adapter comes back as a `SoftPrompt` instead (see
    `nnsight_toolbox.artifacts.peft_prompt`).

    Returns:
        A `LoraSet`: a mapping ``{module path: LORA}`` in the order the modules
        appear in the model, keyed by nnsight path (``"model.transformer.h.0.mlp.c_fc"``,
        equal to ``lora.path``), that switches every adapter on with one call.

    Raises:
        FileNotFoundError: The directory or one of its two files is missing, or
            ``adapter_name`` names no adapter there.
        ValueError: A config this package does not reproduce (another ``peft_type``,
            LoHa, ...), several adapters and no ``adapter_name``, a damaged file,
            or a tensor that does not fit the model; the message names the file.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> export_peft(LORA(model.transformer.h[0].mlp.c_fc, r=8), "peft-adapter")  # or PEFT's save_pretrained
        PosixPath('peft-adapter')
        >>> loras = import_peft(model, "peft-adapter")
        >>> list(loras)
        ['model.transformer.h.0.mlp.c_fc']
        >>> with model.trace("Hello"):
        ...     loras()                       # every adapter; or loras[path]() for one
        ...     logits = model.lm_head.output.save()
    """
    from ..optim.adapter_set import LoraSet
    from ..optim.dora import DoRA
    from ..optim.lora import LORA
    from ..optim.module_copy import ModuleCopy
    from ..optim.module_intervention import check_dtype, check_envoy

    check_envoy(model, "import_peft")
    if model.root is not model:
        raise ValueError(
            f"`import_peft` needs the whole model, since PEFT names modules from its root; "
            f"got the module `{model.path}`. Pass `model` itself."
        )
    check_dtype(dtype, "import_peft")
    directory = _adapter_directory(Path(directory), adapter_name)
    from .peft_prompt import import_prompt_tuning, is_prompt_tuning

    if is_prompt_tuning(directory):  # PEFT prompt tuning: a `SoftPrompt` (see `peft_prompt`)
        return import_prompt_tuning(model, directory, dtype=dtype)
    settings, targets, copies = _read_peft_adapter(model, directory)
    factors = [_factors(target, dtype) for target in targets]  # all checked before any adapter is built
    members: list[Any] = []
    for target, (WA, WB, bias) in zip(targets, factors):
        if target.magnitude is not None:
            lora = DoRA(target.envoy, target.r, dropout=settings.dropout, dtype=dtype)
        else:
            lora = LORA(target.envoy, target.r, dropout=settings.dropout, dtype=dtype, bias=bias is not None)
        with torch.no_grad():
            lora.WA.copy_(WA)
            lora.WB.copy_(WB)
            if bias is not None:
                lora.bias.copy_(bias)
            if target.magnitude is not None:
                lora.magnitude.copy_(target.magnitude.to(dtype))
        members.append(lora)
    for saved in copies:
        members.append(ModuleCopy._from_state(saved.envoy, saved.state))
    return LoraSet(members).eval()  # as PEFT loads an adapter: dropout off, in every adapter of the set


def _factors(target: _Target, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(WA, WB, bias)`` in ``dtype`` with PEFT's scale folded into ``WB`` and the bias; refused if that overflows.

    PEFT computes ``lora_B(lora_A(x)) * scaling``, so ``lora_B``'s bias is scaled too.
    """
    WA = target.A.T.to(dtype)  # (r, in) -> (in, r)
    WB = (target.B.T.to(torch.float64) * target.scale).to(dtype)  # (out, r) -> (r, out), scaled
    bias = None if target.bias is None else (target.bias.to(torch.float64) * target.scale).to(dtype)
    if not bool(torch.isfinite(WB).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
        raise ValueError(
            f"`{target.config_path}`: {target.scale_source} makes PEFT's scale for `{target.name}` "
            f"{target.scale:g}, and `lora_B` times that scale overflows {dtype} (the imported "
            f"adapter would output infinities). The config is damaged, or the adapter diverged; "
            f"PEFT would compute infinities with it too."
        )
    return WA, WB, bias


def _adapter_directory(directory: Path, adapter_name: str | None) -> Path:
    """The folder of the adapter to import: ``directory``, or its subfolder for ``adapter_name``.

    PEFT's ``save_pretrained`` writes the adapter named ``"default"`` into the
    directory itself and each other adapter into a subfolder of its name.
    """
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise TypeError(f"`adapter_name` must be a str (a PEFT adapter's name), got {type(adapter_name).__name__}.")
    top = saved_directory(directory)
    if not top.is_dir():
        return directory  # `_read_peft_adapter` says what is missing
    names = {"default": top} if (top / CONFIG_FILE).is_file() else {}
    names.update({sub.name: sub for sub in sorted(top.iterdir()) if sub.is_dir() and (sub / CONFIG_FILE).is_file()})
    if adapter_name is None:
        if names and "default" not in names:
            raise FileNotFoundError(
                f"`{directory}` holds no adapter at its top (`{CONFIG_FILE}`), only in subfolders: "
                f"{', '.join(repr(n) for n in names)}. Pick one with "
                f"`import_peft(model, directory, adapter_name=...)`."
            )
        if len(names) > 1:
            raise ValueError(
                f"`{directory}` holds {len(names)} PEFT adapters: {', '.join(repr(n) for n in names)} "
                f"(PEFT saves the one named 'default' at the top and each other in a subfolder of "
                f"its name). Pick one with `import_peft(model, directory, adapter_name=...)`."
            )
        return directory
    if adapter_name not in names:
        raise FileNotFoundError(
            f"`{directory}` holds no PEFT adapter named {adapter_name!r}; it holds "
            f"{', '.join(repr(n) for n in names) or 'none'}. Pass one of those as `adapter_name`."
        )
    return names[adapter_name] if adapter_name != "default" else directory


def _read_peft_adapter(model: "Envoy", directory: Path) -> tuple["_Settings", list[_Target], list[_Copy]]:
    """Every check of a PEFT adapter directory against ``model``, in module order.

    Shapes are checked against the safetensors header before any tensor data is read.
    """
    hint = "A PEFT LoRA adapter directory holds `adapter_config.json` and `adapter_model.safetensors`."
    directory = saved_directory(directory)  # the old copy, if an export was interrupted mid-swap
    directory = require_directory(directory, "a PEFT adapter", hint)
    config_path = require_file(directory / CONFIG_FILE, "the adapter's PEFT config", hint)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file() and (directory / PICKLED_WEIGHTS_FILE).is_file():
        raise ValueError(
            f"`{directory / PICKLED_WEIGHTS_FILE}` is a pickle, which `import_peft` never loads "
            f"(unpickling can run arbitrary code). Re-save the adapter as safetensors with "
            f"PEFT: `PeftModel.from_pretrained(base, directory).save_pretrained(new_directory)`."
        )
    require_file(weights_path, "the adapter's tensors", hint)
    config = read_json(config_path)
    settings = _check_config(config, config_path)
    header = read_header(weights_path)  # no tensor data yet: a file larger than its header is refused
    order = {name: index for index, (name, _) in enumerate(model._module.named_modules())}
    copy_keys = _module_copy_keys(model, header, settings, weights_path)
    header = {key: info for key, info in header.items() if key not in copy_keys}

    groups: dict[str, dict[str, TensorInfo]] = {}
    keys: dict[tuple[str, str], str] = {}  # (name, role) -> the key that supplied it
    kinds: dict[str, bool] = {}  # name -> is an embedding pair
    strays = []
    for key, info in header.items():
        match = _KEY.match(key)
        if match is None:
            strays.append(key)
            continue
        role, embedding = _PARTS[match["part"]]
        name = match["name"]
        if embedding is not None and kinds.setdefault(name, embedding) != embedding:
            raise ValueError(f"`{weights_path}` mixes Linear and Embedding LoRA tensors for `{name}`.")
        if (name, role) in keys:  # with and without the `base_model.model.` prefix
            raise ValueError(
                f"`{weights_path}` holds both `{keys[name, role]}` and `{key}`, which name the same "
                f"tensor of `{name}`; whichever is read last would win, and the order is not fixed. "
                f"Keep one of the two (PEFT writes keys with the `{KEY_PREFIX}` prefix)."
            )
        keys[name, role] = key
        groups.setdefault(name, {})[role] = info
    if strays:
        raise ValueError(
            f"`{weights_path}` holds tensors that are neither LoRA tensors nor those of a module "
            f"in the config's `modules_to_save` ({settings.modules_to_save or 'none'}), e.g. "
            f"{strays[:3]}. `import_peft` takes {SUPPORTED}."
        )
    if not groups and not copy_keys:
        raise ValueError(f"`{weights_path}` holds no LoRA tensors.")

    missing = [name for name in groups if name not in order]
    if missing:
        raise ValueError(
            f"`{weights_path}` adapts {missing[:3]}, which this model has no module named "
            f"(its modules are named like {list(order)[1:4]}). Was the adapter trained on "
            f"another architecture? Pass the model it was trained on."
        )
    targets = []
    for name in sorted(groups, key=order.__getitem__):
        if name not in kinds and "magnitude" in groups[name]:
            kinds[name] = layer_kind(envoy_at(model, name)._module) == "Embedding"
        if name not in kinds:
            raise ValueError(
                f"`{weights_path}` holds a base weight for `{name}` (`{name}.base_layer.weight`) "
                f"but no LoRA tensors for it; only a module that is adapted may carry one."
            )
        _check_layout(envoy_at(model, name), name, groups[name], kinds[name], settings, weights_path, keys)
    tensors = read_tensors(weights_path)  # every shape fits the model: the file is as small as they are
    for name in sorted(groups, key=order.__getitem__):
        pair = {role: tensors[keys[name, role]] for role in groups[name]}
        targets.append(_check_target(envoy_at(model, name), name, pair, settings, weights_path, config_path, keys))
    copies = []
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, (name, tensor_name) in copy_keys.items():
        if tensors[key].is_floating_point():
            check_finite(tensors[key], key, weights_path)
        by_module.setdefault(name, {})[tensor_name] = tensors[key]
    for name in sorted(by_module, key=order.__getitem__):
        copies.append(_Copy(envoy=envoy_at(model, name), name=name, state=by_module[name]))
    return settings, targets, copies


def _module_copy_keys(
    model: "Envoy", header: dict[str, TensorInfo], settings: "_Settings", path: Path
) -> dict[str, tuple[str, str]]:
    """The saved tensors of PEFT's ``modules_to_save``: key -> (module name, tensor name in its state_dict).

    PEFT wraps every module whose name ends with an entry (a plain ``endswith``,
    as ``peft.utils.other._set_trainable`` matches; the outermost, when they nest) and saves the copy's whole ``state_dict``
    under the module's own name. Each such module must be saved whole, and fit.
    """
    if not settings.modules_to_save:
        return {}
    from ..optim.module_copy import _check_single_input

    names = [
        name
        for name, _ in model._module.named_modules()
        if name and any(name.endswith(entry) for entry in settings.modules_to_save)  # PEFT's `_set_trainable` rule
    ]
    names = [name for name in names if not any(name.startswith(outer + ".") for outer in names)]
    found: dict[str, tuple[str, str]] = {}
    for name in names:
        module = model._module.get_submodule(name)
        expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        present = {}
        for tensor_name in expected:
            for key in (f"{KEY_PREFIX}{name}.{tensor_name}", f"{name}.{tensor_name}"):
                if key in header:
                    present[tensor_name] = key
        if not present:
            continue  # PEFT's defaults (`classifier`, `score`) may name modules the adapter did not save
        if set(present) != set(expected):
            raise ValueError(
                f"`{path}` saves only {sorted(present)} of `{name}`, a module in `modules_to_save`, "
                f"but its copy needs all of {sorted(expected)}. The file is incomplete."
            )
        for tensor_name, key in present.items():
            info = header[key]
            if tuple(info.shape) != expected[tensor_name]:
                raise ValueError(
                    f"`{path}`: `{key}` has shape {tuple(info.shape)}, but the model's `{name}.{tensor_name}` "
                    f"has {expected[tensor_name]}. Was the adapter trained on another model?"
                )
            found[key] = (name, tensor_name)
        try:
            _check_single_input(envoy_at(model, name))
        except TypeError as error:
            raise ValueError(f"`{path}` saves a trained copy of `{name}` (`modules_to_save`), which cannot be imported: {error}") from None
    return found


@dataclass(frozen=True)
class _Settings:
    r: int
    lora_alpha: float
    use_rslora: bool
    dropout: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()

    def rank_and_scale(self, name: str) -> tuple[int, float, str]:
        """PEFT's rank and scaling for module ``name``, and which setting gave the alpha."""
        r, _ = _pattern_value(self.rank_pattern, name, self.r)
        lora_alpha, key = _pattern_value(self.alpha_pattern, name, self.lora_alpha)
        source = f"`alpha_pattern` {key!r}: {lora_alpha!r}" if key is not None else f"`lora_alpha`={lora_alpha!r}"
        return r, lora_alpha / (math.sqrt(r) if self.use_rslora else r), source


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> tuple[Any, str | None]:
    """PEFT's rule: the value of the first key whose regex matches the end of ``name``
    at a dot boundary, and that key (``None``: no key matched, ``default``)."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value, key
    return default, None


def _check_config(config: dict[str, Any], path: Path) -> _Settings:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"`{path}` describes a {peft_type!r} adapter (`peft_type`), but `import_peft` takes "
            f"LoRA adapters (`peft_type` 'LORA'): {SUPPORTED}; and prompt tuning "
            f"(`peft_type` 'PROMPT_TUNING', as a `SoftPrompt`). Load it with "
            f"`peft.PeftModel.from_pretrained` instead."
        )
    for key, variant in _VARIANTS.items():
        if config.get(key) not in (None, False, [], {}):
            raise ValueError(
                f"`{path}` describes a {variant} adapter, which `import_peft` does not reproduce; "
                f"it takes {SUPPORTED}. Load it with `peft.PeftModel.from_pretrained` instead."
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"`{path}` trains the model's biases too (`bias`={config['bias']!r}); `import_peft` "
            f"takes adapters with `bias`='none' only, since those biases are not a LoRA term."
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"`{path}` was initialised with `init_lora_weights`={init!r}, which makes PEFT "
            f"change the base weights when it loads the adapter, so the adapter alone does "
            f"not reproduce it. Convert it to plain LoRA with PEFT first (`save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...)`)."
        )
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"`{path}`: `r` should be a positive int, got {r!r}.")
    lora_alpha = config.get("lora_alpha", 8)
    if not is_number(lora_alpha):
        raise ValueError(f"`{path}`: `lora_alpha` should be a number, got {lora_alpha!r}.")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"`{path}`: `use_rslora` should be true or false, got {use_rslora!r}.")
    dropout = config.get("lora_dropout", 0.0)
    if not is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`{path}`: `lora_dropout` should be a number in [0, 1), got {dropout!r}.")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        ok = isinstance(pattern, dict) and all(isinstance(k, str) and is_number(v) for k, v in pattern.items())
        if not ok:
            raise ValueError(f"`{path}`: `{key}` should map module-name patterns to numbers, got {pattern!r}.")
        for k, v in pattern.items():
            try:
                re.compile(k)
            except re.error as error:
                raise ValueError(f"`{path}`: `{key}` key {k!r} is not a valid regular expression ({error}).") from error
            if key == "rank_pattern" and (not isinstance(v, int) or v < 1):
                raise ValueError(
                    f"`{path}`: `rank_pattern` gives {k!r} the rank {v!r}, but a rank must be a "
                    f"positive int (PEFT divides by it). Fix the entry, or drop it to use `r`={r}."
                )
        patterns[key] = pattern
    flags = {}
    for key in ("use_dora", "lora_bias"):
        flags[key] = config.get(key, False)
        if not isinstance(flags[key], bool):
            raise ValueError(f"`{path}`: `{key}` should be true or false, got {flags[key]!r}.")
    if flags["use_dora"] and flags["lora_bias"]:
        raise ValueError(f"`{path}` sets both `use_dora` and `lora_bias`, which PEFT refuses together; the config is damaged.")
    modules_to_save = config.get("modules_to_save") or []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    if not isinstance(modules_to_save, list) or not all(isinstance(m, str) for m in modules_to_save):
        raise ValueError(f"`{path}`: `modules_to_save` should be a list of module names, got {modules_to_save!r}.")
    return _Settings(
        r, float(lora_alpha), use_rslora, float(dropout), patterns["rank_pattern"], patterns["alpha_pattern"],
        use_dora=flags["use_dora"], lora_bias=flags["lora_bias"], modules_to_save=tuple(modules_to_save),
    )


def _check_layout(
    envoy: "Envoy",
    name: str,
    pair: dict[str, TensorInfo],
    embedding: bool,
    settings: _Settings,
    path: Path,
    keys: dict[tuple[str, str], str],
) -> None:
    """One module's tensors, as the header describes them, must fit the model and the config."""
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    for role, tensor_name in zip("AB", names):
        if role not in pair:
            raise ValueError(f"`{path}` has no `{KEY_PREFIX}{name}.{tensor_name}`: each adapted module needs both tensors.")
    kind = layer_kind(envoy._module)
    if kind is None or (kind == "Embedding") != embedding:
        expected = "an `nn.Embedding`" if embedding else "an `nn.Linear` or GPT-2 `Conv1D`"
        raise ValueError(
            f"`{path}` holds {names[0]} tensors for `{name}`, which need {expected}, but the "
            f"model's module there is {describe_module(envoy)}. Was the adapter trained on another model?"
        )
    r, _, _ = settings.rank_and_scale(name)
    dims = weight_dims(envoy._module)
    expected_shapes = {"A": (r, dims.input_dim), "B": (dims.output_dim, r)}
    for role in "AB":
        info, full = pair[role], keys[name, role]
        if tuple(info.shape) != expected_shapes[role]:
            raise ValueError(
                f"`{path}`: tensor `{full}` has shape {tuple(info.shape)}, but the model's "
                f"{kind} `{name}` with r={r} (from the config) needs {expected_shapes[role]}. "
                f"Was the adapter trained on another model, or is the config from another adapter?"
            )
        if not info.is_floating_point():
            raise ValueError(f"`{path}`: tensor `{full}` is {info.dtype or info.code}, not floating point.")
    if embedding and settings.use_dora:
        raise ValueError(
            f"`{path}` is a DoRA adapter on the embedding `{name}`; `import_peft` reproduces DoRA "
            f"on Linear and Conv1D layers only. Load it with `peft.PeftModel.from_pretrained` instead."
        )
    for role, flag, tensor_name in (("magnitude", settings.use_dora, "lora_magnitude_vector"), ("bias", settings.lora_bias, "lora_B.bias")):
        if flag and role not in pair:
            raise ValueError(
                f"`{path}` has no `{KEY_PREFIX}{name}.{tensor_name}`, which the config's "
                f"`{'use_dora' if role == 'magnitude' else 'lora_bias'}` needs for each adapted module."
            )
        if role in pair:
            full = keys[name, role]
            if not flag:
                raise ValueError(
                    f"`{path}` holds `{full}`, but the config does not set "
                    f"`{'use_dora' if role == 'magnitude' else 'lora_bias'}`; the two files do not belong together."
                )
            if tuple(pair[role].shape) != (dims.output_dim,):
                raise ValueError(
                    f"`{path}`: tensor `{full}` has shape {tuple(pair[role].shape)}, but the model's "
                    f"{kind} `{name}` needs {(dims.output_dim,)}. Was the adapter trained on another model?"
                )
    if "base" in pair:
        _check_saved_base_shape(envoy, name, pair["base"], path)


def _check_target(
    envoy: "Envoy",
    name: str,
    pair: dict[str, torch.Tensor],
    settings: _Settings,
    path: Path,
    config_path: Path,
    keys: dict[tuple[str, str], str],
) -> _Target:
    """One module's tensors, read after `_check_layout` passed: finite, and a base weight that is the model's."""
    for role in ("A", "B", "bias", "magnitude"):
        if role in pair:
            check_finite(pair[role], keys[name, role], path)
    if "base" in pair:
        _check_saved_base_weight(envoy, name, pair["base"], path)
    r, scale, source = settings.rank_and_scale(name)
    return _Target(
        envoy=envoy, name=name, r=r, scale=scale, scale_source=source, config_path=config_path, A=pair["A"], B=pair["B"],
        bias=pair.get("bias"), magnitude=pair.get("magnitude"),
    )


def _check_saved_base_shape(envoy: "Envoy", name: str, saved: TensorInfo, path: Path) -> None:
    weight = envoy._module.weight
    key = f"{KEY_PREFIX}{name}.base_layer.weight"
    if tuple(saved.shape) != tuple(weight.shape):
        raise ValueError(
            f"`{path}`: `{key}` has shape {tuple(saved.shape)}, but the model's `{name}` weight "
            f"has {tuple(weight.shape)}: the adapter was trained with a resized vocabulary. "
            f"Resize the model's embeddings the same way before importing it."
        )


def _check_saved_base_weight(envoy: "Envoy", name: str, saved: torch.Tensor, path: Path) -> None:
    """A base weight PEFT saved beside the adapter must be the model's own weight."""
    weight = envoy._module.weight
    key = f"{KEY_PREFIX}{name}.base_layer.weight"
    if weight.is_meta:
        warnings.warn(
            f"`{path}` carries the base weight of `{name}` (PEFT saves it for targeted "
            f"embeddings), and the model is not loaded yet, so it could not be checked against "
            f"the model's own weight. The imported adapters reproduce PEFT only if it is the same.",
            stacklevel=5,  # the caller of `import_peft`
        )
        return
    if not torch.equal(saved.to(weight.dtype), weight.detach().cpu()):
        raise ValueError(
            f"`{path}`: `{key}` differs from the model's own `{name}` weight, so PEFT would "
            f"replace that weight when loading the adapter, and the LoRA tensors alone do not "
            f"reproduce it. Import it onto the model it was trained on."
        )
