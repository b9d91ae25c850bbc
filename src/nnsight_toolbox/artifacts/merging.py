"""Folding an adapter into its layer's weight, and taking it back out.

A merged adapter costs nothing at run time: the layer computes with
``W + alpha * dW`` and no delta rides in the forward::

    merge    W  <-  round(float32(W) + alpha * dW)        dW = WA @ WB, laid out like W
    unmerge  W  <-  the copy of W kept at merge           (bit-exact) if W is still what merge left,
             W  <-  round(float32(W) - alpha * dW)        otherwise (exact up to rounding; warns)

    layer       W            dW
    Linear      (out, in)    (WA @ WB).T   # (in, r) @ (r, out) -> (in, out) -> (out, in)
    Conv1D      (in, out)    WA @ WB
    Embedding   (V, dim)     WA @ WB       # row v gains WA[v] @ WB, what the lookup adds

Two variants change the rule (PEFT's ``merge`` does the same):

    lora_bias  b_layer  <-  round(float32(b_layer) + alpha * bias)       the layer's bias, kept and restored likewise
    DoRA       W  <-  round(m / ||W + alpha * dW||_row * (W + alpha * dW))  rows of the (out, in) layout,
               the norm taken on the unmerged weight, as PEFT's ``DoraLinearVariant.merge_safe``

``dW`` is formed and added in float32 and rounded once to the weight's dtype,
as PEFT merges: a bf16 weight keeps 8 bits of mantissa, and forming ``dW`` in
bf16 would round twice. Merging checks the result for NaN/Inf before writing,
so a refused merge leaves the weight untouched.

Unmerging restores the original bits: merge keeps a copy of the weight on the
CPU (host memory the size of the merged weights) and a SHA-256 of the bytes it
wrote. If anything changed the weight since, by even one bit (another adapter
merged into the same layer, a ``load_state_dict``, two rows swapped), restoring
the copy would undo that too, so unmerge subtracts its own delta in float32
instead and warns. A sum cannot tell: permuting two neurons keeps it.

Exactly one object owns a merge: a copy of a merged adapter (``copy.copy``,
``copy.deepcopy``, one sent to a remote server) is not merged, so only the
original can unmerge, and the delta is never taken out twice.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..optim.activation import check_alpha
from .layers import describe_module, layer_kind

if TYPE_CHECKING:
    from ..optim.lora import LORA

__all__ = ["MergeRecord", "merge_lora", "unmerge_lora", "weight_delta"]


@dataclass
class MergeRecord:
    """What `unmerge_lora` needs to take a merge back out.

    Attributes:
        alpha: The scale the adapter was merged with.
        WA: The adapter's ``WA`` at merge time ``(input_dim, r)``, so training it
            while merged does not change what unmerge subtracts.
        WB: Likewise ``(r, output_dim)``.
        original: The weight before the merge, on the CPU.
        fingerprint: SHA-256 of the merged weight's bytes, to tell whether it changed since.
        bias: The adapter's ``bias`` at merge time, for an adapter with one.
        original_bias: The layer's bias before the merge, on the CPU, likewise.
        bias_fingerprint: SHA-256 of the merged bias's bytes, likewise.
        scale: DoRA's per-output factor ``m / ||W + alpha * dW||`` in float32, for a DoRA adapter.
    """

    alpha: float
    WA: torch.Tensor
    WB: torch.Tensor
    original: torch.Tensor
    fingerprint: bytes
    bias: torch.Tensor | None = None
    original_bias: torch.Tensor | None = None
    bias_fingerprint: bytes | None = None
    scale: torch.Tensor | None = None


def weight_delta(kind: str, WA: torch.Tensor, WB: torch.Tensor, alpha: float, device: torch.device) -> torch.Tensor:
    """``alpha * WA @ WB`` in float32 on ``device``, laid out like the layer's weight.

    Examples:
        >>> c_fc = LORA(model.transformer.h[0].mlp.c_fc, r=8)
        >>> weight_delta("Conv1D", c_fc.WA, c_fc.WB, 1.0, torch.device("cpu")).shape   # (in, out), as Conv1D's weight
        torch.Size([32, 128])
        >>> weight_delta("Linear", c_fc.WA, c_fc.WB, 1.0, torch.device("cpu")).shape   # (out, in), as nn.Linear's
        torch.Size([128, 32])
    """
    delta = WA.detach().to(device, torch.float32) @ WB.detach().to(device, torch.float32)  # (in, r) @ (r, out)
    delta = delta * alpha
    return delta.T if kind == "Linear" else delta  # Linear stores (out, in)


def merge_lora(lora: "LORA", alpha: float = 1.0) -> None:
    """Fold ``alpha * WA @ WB`` into the weight of ``lora``'s layer.

    Examples:
        >>> c_fc = LORA(model.transformer.h[0].mlp.c_fc, r=8)
        >>> merge_lora(c_fc, alpha=1.0)
        >>> c_fc.merged
        True
    """
    alpha = check_alpha(alpha)
    if lora.merged:
        raise RuntimeError(
            f"The adapter on `{lora.path}` is already merged (alpha={lora._merge_record.alpha}); "
            f"merging again would add its delta twice. Call `lora.unmerge()` first to merge "
            f"with another alpha."
        )
    kind, weight = _mergeable_weight(lora, "merge")
    layer_bias = _mergeable_bias(lora, "merge") if lora.bias is not None else None
    delta = weight_delta(kind, lora.WA, lora.WB, alpha, weight.device)
    merged, scale = lora._merged_weight(kind, weight.detach().to(torch.float32), delta)  # DoRA rescales each output row
    merged = merged.to(weight.dtype)
    merged_bias = None
    if layer_bias is not None:  # PEFT: base_layer.bias += lora_B.bias * scaling
        lora_bias = lora.bias.detach().to(layer_bias.device, torch.float32)
        merged_bias = (layer_bias.detach().to(torch.float32) + alpha * lora_bias).to(layer_bias.dtype)
    if not bool(torch.isfinite(merged).all()) or (merged_bias is not None and not bool(torch.isfinite(merged_bias).all())):
        raise ValueError(
            f"Merging the adapter on `{lora.path}` with alpha={alpha} would put NaN or "
            f"infinite values into its weight ({weight.dtype}), so it was refused and the "
            f"weight is unchanged. Check `lora.WA` and `lora.WB` for NaN/Inf, or merge with a smaller alpha."
        )
    record = MergeRecord(
        alpha=alpha,
        WA=lora.WA.detach().clone(),
        WB=lora.WB.detach().clone(),
        original=weight.detach().to("cpu", copy=True),
        fingerprint=_fingerprint(merged),
        scale=scale,
    )
    if merged_bias is not None:
        record.bias = lora.bias.detach().clone()
        record.original_bias = layer_bias.detach().to("cpu", copy=True)
        record.bias_fingerprint = _fingerprint(merged_bias)
    with torch.no_grad():
        weight.copy_(merged)
        if merged_bias is not None:
            layer_bias.copy_(merged_bias)
    lora._merge_record = record


def unmerge_lora(lora: "LORA") -> None:
    """Take a merged adapter back out of its layer's weight.

    Examples:
        >>> c_fc = LORA(model.transformer.h[0].mlp.c_fc, r=8)
        >>> merge_lora(c_fc, alpha=1.0)
        >>> unmerge_lora(c_fc)
        >>> c_fc.merged
        False
    """
    record = lora._merge_record
    if record is None:
        raise RuntimeError(f"The adapter on `{lora.path}` is not merged; there is nothing to unmerge.")
    kind, weight = _mergeable_weight(lora, "unmerge")
    if tuple(weight.shape) != tuple(record.original.shape):
        raise RuntimeError(
            f"The weight of `{lora.path}` now has shape {tuple(weight.shape)}, but it was "
            f"{tuple(record.original.shape)} when the adapter was merged; the layer was replaced."
        )
    with torch.no_grad():
        if _fingerprint(weight) == record.fingerprint:
            weight.copy_(record.original.to(weight.device))  # the original bits, exactly
        else:
            delta = weight_delta(kind, record.WA, record.WB, record.alpha, weight.device)
            current = weight.detach().to(torch.float32)
            if record.scale is not None:  # DoRA: undo the row scaling first, as PEFT's `unmerge`
                scale = record.scale.to(weight.device)
                current = current / (scale[:, None] if kind == "Linear" else scale[None, :])
            weight.copy_((current - delta).to(weight.dtype))
            warnings.warn(
                f"The weight of `{lora.path}` changed after the adapter was merged into it "
                f"(another merge into the same layer, new weights loaded, or an edit), so the "
                f"saved original was not restored; the adapter's delta was subtracted in "
                f"float32 instead, which is exact only up to rounding. Unmerge adapters in "
                f"the reverse order of merging to restore the weights bit for bit.",
                stacklevel=3,
            )
        if record.original_bias is not None:
            bias = _mergeable_bias(lora, "unmerge")
            if _fingerprint(bias) == record.bias_fingerprint:
                bias.copy_(record.original_bias.to(bias.device))
            else:
                change = record.alpha * record.bias.to(bias.device, torch.float32)
                bias.copy_((bias.detach().to(torch.float32) - change).to(bias.dtype))
                warnings.warn(
                    f"The bias of `{lora.path}` changed after the adapter was merged into it, so "
                    f"the saved original was not restored; the adapter's bias was subtracted in "
                    f"float32 instead, which is exact only up to rounding.",
                    stacklevel=3,
                )
    lora._merge_record = None


def _mergeable_bias(lora: "LORA", verb: str) -> torch.nn.Parameter:
    """The layer's bias, into which a biased adapter's bias merges (PEFT requires one too)."""
    bias = getattr(lora.module._module, "bias", None)
    if not isinstance(bias, torch.Tensor):
        raise RuntimeError(
            f"Cannot {verb} the adapter on `{lora.path}`: it has a bias (`bias=True`), which merges "
            f"into the layer's own bias, and {describe_module(lora.module)} has none (PEFT refuses "
            f"this merge too). Keep calling `lora()` inside traces instead."
        )
    return bias


def _mergeable_weight(lora: "LORA", verb: str) -> tuple[str, torch.nn.Parameter]:
    """The layer kind and weight of ``lora``'s module, after checking it can be merged."""
    envoy = lora.module
    module = envoy._module
    kind = layer_kind(module)
    if kind is None:
        raise TypeError(
            f"Cannot {verb} the adapter on {describe_module(envoy)}: only an `nn.Linear`, "
            f"GPT-2 `Conv1D` or `nn.Embedding` has a weight a low-rank term can be folded "
            f"into, and this module's output is computed by several layers. Keep calling "
            f"`lora()` inside traces, or train an adapter on one of its Linear layers."
        )
    weight = module.weight
    if weight.is_meta:
        raise RuntimeError(
            f"Cannot {verb} the adapter on `{envoy.path}`: the model's weights are not loaded "
            f"yet (they are on the meta device). Load the model with `dispatch=True`, or run "
            f"one trace first, then call `lora.{verb}()`."
        )
    if not weight.is_floating_point():
        raise TypeError(
            f"Cannot {verb} the adapter on `{envoy.path}`: its weight is {weight.dtype} "
            f"(quantized?), not floating point. Use `lora()` inside traces instead."
        )
    sharing = [
        name
        for name, parameter in envoy.root._module.named_parameters(remove_duplicate=False)
        if parameter is weight
    ]
    if len(sharing) > 1:
        raise RuntimeError(
            f"Cannot {verb} the adapter on `{envoy.path}`: its weight is tied to other "
            f"parameters ({', '.join(f'`{n}`' for n in sharing)}), so merging would change "
            f"those modules too. Use `lora()` inside traces instead."
        )
    return kind, weight


def _fingerprint(weight: torch.Tensor) -> bytes:
    """SHA-256 of the weight's bytes: any change to any element changes it (a sum would miss a permutation)."""
    data = weight.detach().contiguous().to("cpu").reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).digest()
