"""`SoftPrompt`: trainable vectors in place of an embedding's output at a few positions.

Prompt tuning (Lester et al. 2021, arXiv:2104.08691) prepends ``n`` trainable
"virtual token" embeddings to the input. Here the user puts ``n`` placeholder
tokens at the start of each prompt, and the soft prompt replaces their
embeddings::

    tokens      <p> <p> <p>  The  Eiffel ...
    embedding    e0  e1  e2   eT   eE   ...
    soft prompt  s0  s1  s2   eT   eE   ...      (n = 3, positions 0, 1, 2)

PEFT's virtual tokens take positions 0…n-1 and are attended like real
tokens, so this is the same computation as PEFT's ``PROMPT_TUNING`` (see
`nnsight_toolbox.artifacts.peft_prompt`). Positions count each row's real
tokens, so left padding is never replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .module_intervention import ModuleIntervention, own_tensor
from .positions import PositionSpec, Positions, normalize_positions

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["SoftPrompt"]


class SoftPrompt(ModuleIntervention):
    """``n`` trainable vectors that replace an embedding's output at ``n`` consecutive positions.

    By default the positions are 0…n-1 of each row's real tokens: put ``n``
    placeholder tokens at the start of the prompt. ``alpha`` blends,
    ``lerp(embedding, vectors, alpha)``: 1 replaces, 0 leaves the embedding.

    Args:
        embedding: The nnsight Envoy of the embedding module (``model.transformer.wte``),
            or of any module whose output is ``(batch, tokens, width)``.
        n: The number of vectors (virtual tokens), a positive int.
        dropout: Dropout probability on the vectors, in training mode only.
        dtype: The dtype of the vectors; the result is cast to the output's dtype.
        output_dim: The embedding width, for a module whose width cannot be inferred.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import SoftPrompt
        >>> soft = SoftPrompt(model.transformer.wte, n=4)
        >>> prompt = "####The Eiffel Tower is in"          # 4 placeholder tokens, then the text
        >>> with model.trace(prompt):
        ...     soft()
        ...     logits = model.lm_head.output.save()
        >>> logits.sum().backward()
        >>> soft.embeddings.grad.shape
        torch.Size([4, 32])
    """

    call_name = "soft()"
    alpha_means = "1 replaces the embeddings with the vectors, 0 keeps them"

    reads_positions = True
    """The machinery passes each token's position to `intervene`, so vector k lands at the k-th chosen position.

    Examples:
        >>> from nnsight_toolbox import SoftPrompt
        >>> SoftPrompt.reads_positions
        True
    """

    n: int
    """The number of vectors (virtual tokens).

    Examples:
        >>> from nnsight_toolbox import SoftPrompt
        >>> SoftPrompt(model.transformer.wte, n=4).n
        4
    """

    embeddings: torch.nn.Parameter
    """The vectors, shape ``(n, output_dim)``; start N(0, 1), as PEFT's ``RANDOM`` init.

    Examples:
        >>> from nnsight_toolbox import SoftPrompt
        >>> SoftPrompt(model.transformer.wte, n=4).embeddings.shape
        torch.Size([4, 32])
    """

    def __init__(
        self, embedding: Envoy, n: int, *, dropout: float = 0.0, dtype: torch.dtype = torch.float32, output_dim: int | None = None
    ) -> None:
        """``n`` vectors of the embedding's width; see the class for the arguments."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`n` (the number of soft-prompt vectors) must be a positive int, got {n!r}. Pass e.g. `n=8`.")
        ModuleIntervention.__init__(self, embedding, dropout=dropout, dtype=dtype, output_dim=output_dim)
        self.n = n
        self.embeddings = torch.nn.Parameter(torch.randn(n, self.output_dim, dtype=dtype, device=self._device_hint))

    def _positions(self, positions: Positions) -> PositionSpec:
        """``None``: positions 0…n-1; an int ``p >= 0``: positions p…p+n-1."""
        start = 0 if positions is None else positions
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(
                f"`SoftPrompt` takes `positions=` as the first of its {self.n} consecutive positions, a "
                f"non-negative int (0, the default, is the first prompt token), got {positions!r}. "
                f"Put {self.n} placeholder tokens there in every prompt."
            )
        return normalize_positions(list(range(start, start + self.n)))

    def intervene(self, output: torch.Tensor, x: object, alpha: float, positions: torch.Tensor | None = None, spec: PositionSpec | None = None) -> torch.Tensor:
        """The vectors at their positions, ``lerp(output, vector, alpha)``; the machinery keeps only those positions.

        ``positions`` is each token's position among its row's real tokens,
        ``(B, T, 1)``, and ``spec`` the chosen ones (the machinery passes both).

        Examples:
            >>> from nnsight_toolbox import SoftPrompt
            >>> soft = SoftPrompt(model.transformer.wte, n=2)
            >>> spec = soft._positions(None)
            >>> out = soft.intervene(torch.zeros(1, 3, 32), None, 1.0, torch.tensor([[[0], [1], [2]]]), spec)
            >>> torch.equal(out[0, :2], soft.embeddings.detach())
            True
        """
        if output.shape[-1] != self.output_dim:
            raise self._width_error(output)
        if positions is None or spec is None or output.dim() != 3:
            raise ValueError(
                f"`SoftPrompt` on `{self.path}` needs an output of shape (batch, tokens, width) and the "
                f"token positions from the activation machinery; got shape {tuple(output.shape)}. "
                f"Call it inside a trace (`soft()`), on an embedding module."
            )
        index = (positions.reshape(output.shape[:2]) - spec.ints[0]).clamp(0, self.n - 1)  # (B, T): vector k at position start + k
        vectors = self._dropped(own_tensor(self, "embeddings"))[index]  # (B, T, d); kept only at the chosen positions
        if output.dtype == vectors.dtype:
            return torch.lerp(output, vectors, alpha)  # weight 1 gives `vectors` exactly
        return torch.lerp(output.to(vectors.dtype), vectors, alpha).to(output.dtype)

    def extra_repr(self) -> str:
        return ModuleIntervention.extra_repr(self)
