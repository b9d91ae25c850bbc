"""`DoRA`: weight-decomposed low-rank adaptation, on a Linear or GPT-2 Conv1D layer.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
arXiv:2402.09353) splits the adapted weight into a direction and a trained
magnitude ``m``, one number per output feature::

    W' = m / ||W + alpha * dW||_row * (W + alpha * dW)          dW = (WA @ WB).T, laid out (out, in)

    out' = m / ||W + alpha * dW||_row * (W x + alpha * dW x) + b
         = out + (m/n - 1) * (out - b) + (m/n) * alpha * (x @ WA @ WB)      n = ||W + alpha * dW||_row

The second line is what `DoRA.intervene` computes from the layer's output
``out = W x + b`` and input ``x``, in the order PEFT's ``DoraLinearLayer.forward``
does. The norm ``n`` is detached from the autograd graph (Section 4.3 of the
paper, and PEFT), so training follows PEFT's gradients exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..artifacts.layers import describe_module, layer_kind
from .lora import LORA
from .module_intervention import check_envoy

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["DoRA"]


class DoRA(LORA):
    """A DoRA adapter: a `LORA` whose adapted weight is rescaled, row by row, to a trained magnitude.

    Inside a trace, ``dora(alpha)`` makes the layer compute
    ``m / ||W + alpha * dW||_row * (W x + alpha * dW x) + b`` with
    ``dW = (WA @ WB).T``: ``alpha`` scales the low-rank term inside the norm, as
    PEFT's ``scaling`` does, so ``alpha=1`` reproduces a PEFT DoRA adapter
    imported with `import_peft`. Unlike LoRA, ``alpha=0`` is not the base layer
    but ``m / ||W||_row * W x + b``, which equals it only while ``m`` is still
    its initial ``||W||_row``.

    The row norm is treated as a constant in the backward pass, as the paper
    (Section 4.3) and PEFT do. Dropout (training mode only) acts on the input
    of both terms, as in PEFT: the layer's ``W x`` is then recomputed from the
    dropped input. Only ``nn.Linear`` and GPT-2 ``Conv1D`` layers have the
    weight DoRA needs.

    Args:
        module: The Envoy of an ``nn.Linear`` or GPT-2 ``Conv1D`` layer.
        r: The rank.
        dropout: Dropout on the input, in training mode.
        dtype: The adapter's dtype, float32 by default as in PEFT.
        input_dim: The input width; read from the layer's weight when not given.
        output_dim: The output width, likewise.

    Attributes:
        magnitude: ``torch.nn.Parameter`` of shape ``(output_dim,)``, PEFT's
            ``lora_magnitude_vector``. Starts at ``||W||_row``, so a fresh
            adapter changes nothing until trained.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> dora = DoRA(model.transformer.h[0].mlp.c_fc, r=4)
        >>> optimizer = torch.optim.AdamW(dora.parameters(), lr=1e-2)   # WA, WB and the magnitude
        >>> with model.trace("Hello"):
        ...     dora()
        ...     logits = model.lm_head.output.save()
        >>> logits.sum().backward()
        >>> dora.magnitude.grad.shape
        torch.Size([128])
    """

    call_name = "dora()"

    magnitude: torch.nn.Parameter
    """The trained magnitude ``(output_dim,)``: PEFT's ``lora_magnitude_vector``.

    Examples:
        >>> dora = DoRA(model.transformer.h[0].mlp.c_fc, r=4)
        >>> w = model.transformer.h[0].mlp.c_fc.weight        # Conv1D: (in, out)
        >>> torch.allclose(dora.magnitude, w.norm(dim=0))     # starts at the row norms of W (out, in)
        True
    """

    def __init__(
        self,
        module: Envoy,
        r: int,
        *old_positional: Any,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        input_dim: int | None = None,
        output_dim: int | None = None,
    ) -> None:
        """A DoRA adapter of rank ``r`` on a Linear or Conv1D ``module``; see the class."""
        check_envoy(module, type(self).__name__)
        kind = layer_kind(module._module)
        if kind not in ("Linear", "Conv1D"):
            raise TypeError(
                f"`DoRA` needs an `nn.Linear` or GPT-2 `Conv1D` layer, whose weight it "
                f"rescales, but got {describe_module(module)}. Use `LORA` on this module, or "
                f"`DoRA` on one of its Linear layers."
            )
        LORA.__init__(self, module, r, *old_positional, dropout=dropout, dtype=dtype, input_dim=input_dim, output_dim=output_dim)
        self._kind = kind
        self.magnitude = torch.nn.Parameter(torch.empty(self.output_dim, device=self.WA.device, dtype=dtype))
        self._reset_magnitude()

    def reset_parameters(self) -> None:
        """Re-initialise ``WA``, ``WB`` as `LORA` does and ``magnitude`` to ``||W||_row`` (PEFT's init).

        Examples:
            >>> dora = DoRA(model.transformer.h[0].mlp.c_fc, r=4)
            >>> dora.reset_parameters()   # back to an adapter that changes nothing
        """
        LORA.reset_parameters(self)
        if "magnitude" in self._parameters:
            self._reset_magnitude()

    def _reset_magnitude(self) -> None:
        weight = self.module._module.weight
        if weight.is_meta:  # a model not loaded yet: the norm is set from the real weight on import
            with torch.no_grad():
                self.magnitude.fill_(1.0)
            return
        with torch.no_grad():
            self.magnitude.copy_(torch.linalg.norm(self._rows(weight.detach().to(self.magnitude)), dim=1))

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The layer's weight laid out ``(out, in)``: nn.Linear's own layout, Conv1D's transpose."""
        return weight if self._kind == "Linear" else weight.T

    def intervene(self, output: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        """The layer's DoRA output from its base ``output = W x + b`` and input ``x``.

        ``out + (m/n - 1) * (out - b) + (m/n) * alpha * (x @ WA @ WB)`` with
        ``n = ||W + alpha * dW||_row`` detached: PEFT's ``DoraLinearLayer.forward``.

        Examples:
            >>> dora = DoRA(model.transformer.h[0].mlp.c_fc, r=4)
            >>> x = torch.randn(1, 3, 32)
            >>> out = model.transformer.h[0].mlp.c_fc._module(x)
            >>> torch.allclose(dora.intervene(out, x), out, atol=1e-6)   # a fresh adapter: no change
            True
        """
        WA, WB = self._factors()
        layer = self.module._module
        weight = self._rows(layer.weight.detach()).to(WA.dtype)  # (out, in)
        low_rank = (WA @ WB).T  # (in, r) @ (r, out) -> (in, out) -> (out, in)
        # PEFT detaches the low-rank weight inside the norm and the norm itself (paper, Section 4.3).
        norm = torch.linalg.norm(weight + alpha * low_rank.detach(), dim=1).detach()  # (out,)
        scale = self.magnitude / norm  # (out,)
        if self.dropout and self.training:
            # PEFT's training path: both terms see the dropped input; `W x` is recomputed from it.
            x = F.dropout(x.to(WA.dtype), self.dropout, training=True)
            base = x @ weight.T  # (..., in) @ (in, out)
        else:
            x = x.to(WA.dtype)
            base = output.to(WA.dtype)
            if layer.bias is not None:
                base = base - layer.bias.detach().to(WA.dtype)  # DoRA rescales W x, never the bias
        lora_out = (x @ WA) @ WB  # (..., in) @ (in, r) @ (r, out)
        if alpha != 1.0:
            lora_out = lora_out * alpha
        adapted = output.to(WA.dtype) + (scale - 1) * base + scale * lora_out
        if adapted.shape != output.shape:
            raise self._mismatch(output, adapted.shape[:-1])
        return adapted.to(output.dtype)

    def add_delta(self, output: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """The same as `intervene` for DoRA: its change to the output is not a sum of a delta.

        Examples:
            >>> dora = DoRA(model.transformer.h[0].mlp.c_fc, r=4)
            >>> x = torch.randn(1, 3, 32)
            >>> out = model.transformer.h[0].mlp.c_fc._module(x)
            >>> torch.equal(dora.add_delta(out, x), dora.intervene(out, x))
            True
        """
        return self.intervene(output, x, alpha)

    def _merged_weight(self, kind: str, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DoRA's merged weight in float32, ``m / ||W + dW||_row * (W + dW)``, and that per-output
        factor (PEFT's ``dora_factor``), which `unmerge` divides out first."""
        combined = weight + delta  # laid out like the layer's weight
        rows = combined if kind == "Linear" else combined.T  # (out, in): a norm per output feature
        scale = self.magnitude.detach().to(weight.device, torch.float32) / torch.linalg.norm(rows, dim=1)  # (out,)
        return combined * (scale[:, None] if kind == "Linear" else scale[None, :]), scale

    def extra_repr(self) -> str:
        return LORA.extra_repr(self) + ", dora=True"
