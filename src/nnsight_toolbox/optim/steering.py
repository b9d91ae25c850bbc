"""`SteeringVector`: a trainable vector added to a module's output.

The steering-vectors / repeng idea (a vector added at a layer, scaled by a
multiplier), made trainable: ``h + alpha * v``. Where it acts is the shared
machinery's job (`nnsight_toolbox.optim.activation`): ``positions=`` plays the
role of steering-vectors' ``min_token_index`` and more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .module_intervention import ModuleIntervention, add_in_dtype

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

    from .intervention_set import InterventionSet

__all__ = ["SteeringVector"]


class SteeringVector(ModuleIntervention):
    """A trainable vector ``v`` added to a module's output: ``h + alpha * dropout(v)``.

    ``v`` starts at zeros, so a fresh vector changes nothing until trained.
    The sum is computed in ``dtype`` and cast back to the output's dtype.

    Args:
        module: The nnsight Envoy of the module, such as ``model.transformer.h[3]``.
            Its output must be a tensor, or a tuple whose first element is one.
        dropout: Dropout probability on ``v``, in training mode only.
        dtype: The dtype of ``v`` and of the sum.
        output_dim: The output width, for a module whose width cannot be inferred.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import SteeringVector
        >>> steer = SteeringVector(model.transformer.h[0])
        >>> optimizer = torch.optim.AdamW(steer.parameters(), lr=1e-2)
        >>> with model.trace("The Eiffel Tower is in"):
        ...     steer(alpha=1.0, positions=-1)        # the last prompt token only
        ...     logits = model.lm_head.output.save()
        >>> logits.sum().backward()
        >>> steer.v.grad.shape
        torch.Size([32])
    """

    call_name = "steer()"

    v: torch.nn.Parameter
    """The vector, shape ``(output_dim,)``; starts at zeros.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> SteeringVector(model.transformer.h[0]).v.shape
        torch.Size([32])
    """

    def __init__(self, module: Envoy, *, dropout: float = 0.0, dtype: torch.dtype = torch.float32, output_dim: int | None = None) -> None:
        """A zero vector of the module's output width; see the class for the arguments."""
        ModuleIntervention.__init__(self, module, dropout=dropout, dtype=dtype, output_dim=output_dim)
        self.v = torch.nn.Parameter(torch.zeros(self.output_dim, dtype=dtype, device=self._device_hint))

    @classmethod
    def from_contrast(
        cls,
        module: Envoy | Sequence[Envoy],
        positive: Sequence[str] | Sequence[tuple[str, str]],
        negative: Sequence[str] | None = None,
        *,
        positions: int = -1,
        method: str = "mean",
        batch_size: int = 32,
        remote: bool = False,
        progress: bool | None = None,
    ) -> SteeringVector | InterventionSet:
        """A vector read from contrastive pairs, not trained: CAA, or a principal component of the differences.

        Reads the module's output at ``positions`` of each positive and negative
        prompt (``-1``: each prompt's own last real token, whatever the padding),
        ``batch_size`` prompts per forward pass, and aggregates the pairs
        (`nnsight_toolbox.optim.contrast.aggregate_contrast`):

        - ``"mean"``: ``mean(positive - negative)``, CAA's vector (steering-vectors'
          ``mean_aggregator``), not rescaled;
        - ``"pca"``: steering-vectors' ``pca_aggregator`` (uncentred, signed by the mean difference);
        - ``"pca_diff"``, ``"pca_center"``: repeng's ``ControlVector.train`` methods (signed by a vote of the pairs).

        The PCA forms are unit vectors: scale them with ``alpha``. Apply as CAA
        does with ``vector(alpha=m, positions=slice(n, None))``.
        ``vector.metadata`` records ``{"method", "positions", "pairs"}``.

        Args:
            module: The Envoy of the module to read and steer, or a list of them: all are
                read in the same forward passes, and an `InterventionSet` comes back in the list's order.
            positive: The positive prompts; or, with ``negative=None``, a list of ``(positive, negative)`` pairs.
            negative: The negative prompts, as many as ``positive``, pair by pair.
            positions: The real token of each prompt to read (an int; ``-1`` the last).
            method: ``"mean"``, ``"pca"``, ``"pca_diff"`` or ``"pca_center"``.
            batch_size: Prompts per forward pass; it changes nothing but speed and memory.
            remote: Read on the model's NDIF server, as a remote ``model.trace`` does;
                only the readings come back.
            progress: A progress bar; ``None``: when the prompts take more than one batch.

        Returns:
            A `SteeringVector` (float32 ``v``) on ``module``, or an `InterventionSet` of them for a list.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> vector = SteeringVector.from_contrast(
            ...     model.transformer.h[1], ["I love it", "Great"], ["I hate it", "Awful"], method="pca")
            >>> round(vector.v.norm().item(), 4), vector.metadata["pairs"]
            (1.0, 2)
            >>> with model.trace("The film was"):
            ...     vector(alpha=4.0, positions=slice(-1, None))   # CAA: from the last prompt token on
            ...     logits = model.lm_head.output.save()
        """
        from .contrast import from_contrast

        return from_contrast(
            cls, module, positive, negative, positions=positions, method=method, batch_size=batch_size, remote=remote, progress=progress
        )

    def intervene(self, output: torch.Tensor, x: object, alpha: float) -> torch.Tensor:
        """``output + alpha * dropout(v)``, in ``v``'s dtype, cast back to ``output``'s.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> steer = SteeringVector(model.transformer.h[0])
            >>> with torch.no_grad():
            ...     _ = steer.v.fill_(1.0)
            ...     steer.intervene(torch.zeros(1, 2, 32), None, 0.5)[0, 0, :3]
            tensor([0.5000, 0.5000, 0.5000])
        """
        # Written out rather than through the base's helpers: this runs on every forward pass of
        # every steered module, and for a formula of one add, each helper call costs about as much.
        if output.shape[-1] != self.output_dim:
            raise self._width_error(output)
        v = self._parameters.get("v")
        if v is None:  # a parametrized vector (torch.nn.utils.parametrize)
            v = self.v
        if self.dropout and self.training:
            v = self._dropped(v)
        if alpha == 1.0 and output.dtype == v.dtype:
            return output + v  # (B, T, d) + (d,)
        return add_in_dtype(output, v, alpha)

    # -- many vectors on one module in one batch: one computation (see `grouped`) -------

    def _grouped_key(self) -> object:
        """What members of one group share (`grouped`): ``None`` for a parametrized vector, which goes one by one."""
        v = self._parameters.get("v")
        if v is None:
            return None
        return (self.output_dim, v.dtype, v.device, self.dropout)

    def _grouped_parameters(self) -> tuple[torch.Tensor, ...]:
        """The tensor `grouped` stacks: ``v``."""
        return (self._parameters["v"],)

    def _grouped_intervene(
        self, output: torch.Tensor, x: object, stacked: tuple, member: torch.Tensor | None, rows: torch.Tensor | None, scale: torch.Tensor | None
    ) -> torch.Tensor:
        """Every group member's ``output + alpha * v`` on its rows at once, as one indexed add on ``(B, T, d)``."""
        V = stacked[0] if member is None else stacked[0].index_select(0, member)  # (M, d)
        if self.dropout and self.training:
            V = F.dropout(V, self.dropout, training=True)
        if scale is None:
            delta = V[:, None, :]
        elif scale.dim() == 1:
            delta = (V * scale[:, None])[:, None, :]
        else:
            delta = V[:, None, :] * scale[:, :, None]  # (M, T, d)
        same = output.dtype is V.dtype
        if rows is None:
            return output + delta if same else (output.to(V.dtype) + delta).to(output.dtype)
        delta = delta.expand(rows.shape[0], output.shape[1], output.shape[2])
        if same:
            return output.index_add(0, rows, delta)
        changed = output.index_select(0, rows).to(V.dtype) + delta
        return output.index_copy(0, rows, changed.to(output.dtype))
