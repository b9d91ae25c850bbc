"""The layers an adapter can leave the trace as: those with one weight matrix.

PEFT's LoRA format and merging both express an adapter through a layer's
weight, so both take only these three layers::

    layer            weight        input        PEFT tensors (this package's)
    ---------------  ------------  -----------  ---------------------------------------------
    nn.Linear        (out, in)     (..., in)    lora_A.weight (r, in) = WA.T
                                                lora_B.weight (out, r) = WB.T
    Conv1D (GPT-2)   (in, out)     (..., in)    the same, with fan_in_fan_out=True
    nn.Embedding     (V, dim)      token ids    lora_embedding_A (r, V) = WA.T
                                                lora_embedding_B (dim, r) = WB.T

Any other module (an MLP block, a decoder layer) has no single weight that a
low-rank term could be folded into: its adapter lives only in this package's
own format (`LORA.save`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["LayerKind", "layer_kind", "hf_name", "describe_module"]

#: The layer classes with a weight form, by the name PEFT and transformers give them.
LayerKind = Literal["Linear", "Conv1D", "Embedding"]


def layer_kind(module: torch.nn.Module) -> LayerKind | None:
    """``"Linear"``, ``"Conv1D"`` or ``"Embedding"``, or ``None`` for any other module.

    Examples:
        >>> layer_kind(model.transformer.h[0].mlp.c_fc._module)
        'Conv1D'
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return "Linear"
    if isinstance(module, Conv1D):
        return "Conv1D"
    if isinstance(module, torch.nn.Embedding):
        return "Embedding"
    return None


def hf_name(envoy: "Envoy") -> str:
    """The Hugging Face module name of ``envoy``: its nnsight path without the root's.

    PEFT names modules as ``model.named_modules()`` does, relative to the model.

    Examples:
        >>> hf_name(model.transformer.h[0].mlp.c_fc)   # path "model.transformer.h.0.mlp.c_fc"
        'transformer.h.0.mlp.c_fc'
    """
    root = envoy.root.path
    path = envoy.path
    if path == root:
        return ""
    return path[len(root) + 1 :] if path.startswith(root + ".") else path


def describe_module(envoy: "Envoy") -> str:
    """``"`path` (Type)"``, for error messages."""
    return f"`{envoy.path}` ({type(envoy._module).__name__})"
