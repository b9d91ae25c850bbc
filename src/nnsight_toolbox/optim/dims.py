"""How wide a module's input and output are, without running the model for real.

An adapter on a module needs ``input_dim`` (the last dimension of the module's
first input) and ``output_dim`` (the last dimension of its output, or of the
first element of a tuple output).

- Layers with a weight say it directly: `torch.nn.Linear`, GPT-2's ``Conv1D``
  (weight ``(in, out)``, the transpose of Linear's) and `torch.nn.Embedding`
  (whose input is token ids, so ``input_dim`` is the vocabulary size).
- Anything else (an MLP block, a decoder layer, an attention module) is measured
  with an nnsight scan: one forward on fake tensors, which loads no weights and
  so works on a model built on the meta device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

#: The prompt a scan runs on. Any short text works: only widths are read.
SCAN_PROMPT = "a"


class ModuleDims:
    """The widths an adapter on a module needs.

    A plain class rather than a dataclass: this package travels to remote
    servers as source, and a dataclass's generated methods have none, so they
    would travel as bytecode, which another Python version cannot load.

    Attributes:
        input_dim: Last dimension of the module's first input (the vocabulary
            size for an embedding, whose input is token ids).
        output_dim: Last dimension of the module's output.
        takes_ids: Whether the input is integer token ids (an embedding).
    """

    __slots__ = ("input_dim", "output_dim", "takes_ids")

    def __init__(self, input_dim: int, output_dim: int, takes_ids: bool = False) -> None:
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.takes_ids = takes_ids

    def __repr__(self) -> str:
        return f"ModuleDims(input_dim={self.input_dim}, output_dim={self.output_dim}, takes_ids={self.takes_ids})"


def weight_dims(module: torch.nn.Module) -> ModuleDims | None:
    """Widths read off a known layer's weight, or ``None`` for any other module."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return ModuleDims(module.in_features, module.out_features)
    if isinstance(module, Conv1D):  # weight (in, out)
        return ModuleDims(module.weight.shape[0], module.weight.shape[1])
    if isinstance(module, torch.nn.Embedding):
        return ModuleDims(module.num_embeddings, module.embedding_dim, takes_ids=True)
    return None


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor an adapter acts on: ``value`` itself, or the first element of a
    tuple, list or ``ModelOutput``; ``None`` when there is none."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # transformers' ModelOutput is an ordered dict
        value = tuple(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def scan_dims(envoy: "Envoy") -> ModuleDims:
    """Widths measured by an nnsight scan of the whole model on fake tensors."""
    return scan_many_dims([envoy])[envoy.path]


def scan_many_dims(envoys: "list[Envoy]") -> dict[str, ModuleDims]:
    """Widths of several modules of one model, measured by a single scan.

    One scan costs a fake forward of the whole model, so many adapters share one.
    """
    root = envoys[0].root
    if not hasattr(root, "scan") or getattr(root, "tokenizer", None) is None:
        envoy = envoys[0]
        raise ValueError(
            f"Cannot infer the input and output widths of `{envoy.path}` "
            f"({type(envoy._module).__name__}): it is not a Linear, Conv1D or "
            f"Embedding, and the model has no tokenizer to scan it with. Pass "
            f"`input_dim=` and `output_dim=` to `LORA(...)`."
        )
    paths = [envoy.path for envoy in envoys]
    with root.scan(SCAN_PROMPT) as tracer:
        cache = tracer.cache(modules=paths, include_inputs=True)
    return {path: dims_from_values(path, cache[path].input, cache[path].output) for path in paths}


def dims_from_values(path: str, input: Any, output: Any) -> ModuleDims:
    """Widths from a module's first input and its output, with clear errors."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(
            f"`{path}` takes a {type(input).__name__} as its first input, not a "
            f"tensor, so a LoRA has nothing to multiply. Put the adapter on a "
            f"module whose first input is a tensor."
        )
    out = first_tensor(output)
    if out is None:
        raise TypeError(
            f"`{path}` returns a {type(output).__name__} that holds no tensor (a "
            f"tuple's first element must be one), so there is nothing for a LoRA "
            f"to add to. Put the adapter on a module whose output is a tensor."
        )
    if input.is_floating_point():
        return ModuleDims(input.shape[-1], out.shape[-1])
    raise TypeError(
        f"`{path}` takes integer token ids, not activations. A LoRA on token ids "
        f"needs an `nn.Embedding`; put it on the embedding or on a later module."
    )


def infer_dims(envoy: "Envoy") -> ModuleDims:
    """The adapter widths for ``envoy``'s module: from its weight when it has a
    known one, otherwise from a scan."""
    return weight_dims(envoy._module) or scan_dims(envoy)


def infer_many_dims(envoys: "list[Envoy]") -> dict[str, ModuleDims]:
    """`infer_dims` for several modules of one model, with at most one scan."""
    dims = {envoy.path: weight_dims(envoy._module) for envoy in envoys}
    unknown = [envoy for envoy in envoys if dims[envoy.path] is None]
    if unknown:
        dims.update(scan_many_dims(unknown))
    return dims
