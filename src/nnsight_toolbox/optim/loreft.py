"""`LoReFT`: low-rank linear subspace representation fine-tuning (pyreft's ``LoreftIntervention``).

ReFT (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models",
arXiv:2404.03592, eq. 2) edits a hidden state ``h`` (d wide) inside an
r-dimensional subspace spanned by the rows of ``R`` (r, d), which are orthonormal::

    LoReFT(h) = h + R^T (W h + b - R h)        W (r, d), b (r,)
    DiReFT(h) = h + R^T (W h + b)              (no projection out; `DiReFT`)

``R`` is kept orthonormal the way ``torch.nn.utils.parametrizations.orthogonal``
does with ``orthogonal_map="matrix_exp"``: the trainable tensor is a generator
``A`` (d, r), and ``R^T = base @ exp(S)[:, :r]`` where ``S`` is the skew-symmetric
matrix built from ``A``'s lower triangle and ``base`` a fixed orthogonal buffer.
Weight decay pulls ``A`` towards 0, that is ``R`` towards ``base``'s first
columns, which stay orthonormal. (The default map for a non-square matrix,
Householder, which pyreft gets, lets weight decay shrink ``R`` itself.) The
formula is written out here rather than taken from torch's parametrization
because a parametrized module refuses to pickle, and a remote request pickles
the intervention.

``state_dict()`` uses pyreft's keys, so pyreft's own ``state_dict()`` loads here
and ours loads into pyreft: ``rotate_layer`` (d, r) = ``R^T``, ``weight`` (r, d)
and ``bias`` (r,).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F

from .module_intervention import ModuleIntervention, add_in_dtype, own_tensor

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["LoReFT", "ReftBase"]

#: pyreft's state_dict keys, in its order.
REFT_KEYS = ("weight", "bias", "rotate_layer")


class OrthonormalColumns(torch.nn.Module):
    """``weight`` (d, r) with orthonormal columns: ``base @ matrix_exp(skew(generator))[:, :r]``.

    torch's ``orthogonal(..., orthogonal_map="matrix_exp")`` for a tall matrix,
    written out: ``generator`` is the trainable tensor, ``base`` a fixed
    orthogonal (d, d) buffer. It starts as pyreft's ``LowRankRotateLayer``: an
    ``orthogonal_`` init, kept exactly as ``base``'s first columns with ``generator = 0``.
    """

    def __init__(self, d: int, r: int, dtype: torch.dtype, device: torch.device) -> None:
        torch.nn.Module.__init__(self)
        start = torch.empty(d, r, dtype=torch.float32, device=device)
        torch.nn.init.orthogonal_(start)  # as pyreft's LowRankRotateLayer; QR has no half-precision kernel on CPU
        start = start.to(dtype)
        self.generator = torch.nn.Parameter(torch.zeros(d, r, dtype=dtype, device=device))
        self.register_buffer("base", complete_orthonormal(start))
        self._cached: Any = None  # (versions, weight) outside autograd: generation reuses one weight

    @property
    def weight(self) -> torch.Tensor:
        """``R^T``, (d, r)."""
        # Read on every forward pass of the intervention: the tables are read directly (see `own_tensor`).
        generator, base = self._parameters.get("generator"), self._buffers.get("base")
        if generator is None or base is None:  # a parametrization computes it
            generator, base = own_tensor(self, "generator"), own_tensor(self, "base")
        grad = torch.is_grad_enabled() and generator.requires_grad
        key = (generator._version, base._version, generator.data_ptr(), base.data_ptr())
        cached = self._cached
        if not grad and cached is not None and cached[0] == key:
            return cached[1]
        d, r = generator.shape
        lower = generator.tril()  # (d, r): torch's map reads the lower triangle only
        square = torch.cat([lower, lower.new_zeros(d, d - r)], dim=1)  # (d, d)
        rotation = torch.matrix_exp(square - square.mT)[:, :r]  # exp of a skew matrix is orthogonal
        weight = base @ rotation  # (d, d) @ (d, r)
        self._cached = None if grad else (key, weight)
        return weight


class ReftBase(ModuleIntervention):
    """What `LoReFT` and `DiReFT` share: ``R`` (orthonormal rows), ``W`` and ``b``, pyreft's keys.

    Examples:
        >>> from nnsight_toolbox import LoReFT
        >>> reft = LoReFT(model.transformer.h[0], r=4)
        >>> sorted(reft.state_dict())            # pyreft's keys
        ['bias', 'rotate_layer', 'weight']
    """

    call_name = "reft()"

    reads_output = True
    """The formula's backward keeps ``h``: the machinery hands it a copy it will not overwrite.

    Examples:
        >>> from nnsight_toolbox import LoReFT
        >>> LoReFT.reads_output
        True
    """

    r: int
    """The rank of the edited subspace.

    Examples:
        >>> from nnsight_toolbox import LoReFT
        >>> LoReFT(model.transformer.h[0], r=4).r
        4
    """

    rotate_layer: OrthonormalColumns
    """Holds ``weight`` = ``R^T`` ``(d, r)``, kept orthonormal by the matrix-exponential map.

    Its trainable tensor is ``rotate_layer.generator``; ``rotate_layer.base`` is a fixed buffer.

    Examples:
        >>> from nnsight_toolbox import LoReFT
        >>> LoReFT(model.transformer.h[0], r=4).rotate_layer.weight.shape
        torch.Size([32, 4])
    """

    learned_source: torch.nn.Linear
    """``W h + b``: a ``Linear(d, r)``, as pyreft's ``learned_source``.

    Examples:
        >>> from nnsight_toolbox import LoReFT
        >>> LoReFT(model.transformer.h[0], r=4).learned_source.weight.shape
        torch.Size([4, 32])
    """

    def __init__(
        self, module: Envoy, r: int, *, dropout: float = 0.0, dtype: torch.dtype = torch.float32, output_dim: int | None = None
    ) -> None:
        """``R`` orthonormal (pyreft's orthogonal init), ``W, b`` as a fresh ``Linear(d, r)``."""
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"`r` (the rank of the subspace) must be a positive int, got {r!r}. Pass e.g. `r=4`.")
        ModuleIntervention.__init__(self, module, dropout=dropout, dtype=dtype, output_dim=output_dim)
        if r > self.output_dim:
            raise ValueError(f"`r` must be at most the output width {self.output_dim} of `{self.path}`, got r={r}.")
        self.r = r
        self.rotate_layer = OrthonormalColumns(self.output_dim, r, dtype, self._device_hint)
        self.learned_source = torch.nn.Linear(self.output_dim, r, dtype=dtype, device=self._device_hint)  # W h + b

    @property
    def R(self) -> torch.Tensor:
        """``R``, shape ``(r, d)``, orthonormal rows (computed from ``rotate_layer``).

        Examples:
            >>> from nnsight_toolbox import LoReFT
            >>> R = LoReFT(model.transformer.h[0], r=4).R
            >>> torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)
            True
        """
        return self.rotate_layer.weight.T

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> "OrderedDict[str, torch.Tensor]":  # type: ignore[override]
        """pyreft's keys: ``weight`` (r, d), ``bias`` (r,), ``rotate_layer`` (d, r) = ``R^T``.

        Examples:
            >>> from nnsight_toolbox import LoReFT
            >>> {k: tuple(v.shape) for k, v in LoReFT(model.transformer.h[0], r=4).state_dict().items()}
            {'weight': (4, 32), 'bias': (4,), 'rotate_layer': (32, 4)}
        """
        out = OrderedDict() if destination is None else destination
        tensors = (self.learned_source.weight, self.learned_source.bias, self.rotate_layer.weight)
        for key, value in zip(REFT_KEYS, tensors):
            out[prefix + key] = value if keep_vars else value.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Load ``weight``, ``bias`` and ``rotate_layer`` (ours, or pyreft's ``LoreftIntervention.state_dict()``).

        ``R^T`` is restored bit for bit: it becomes the first ``r`` columns of the
        fixed orthogonal ``rotate_layer.base`` (the rest completes it to an
        orthogonal matrix) and the generator is reset to 0, so ``exp(0) = I``.
        The parameters stay the same objects, so an optimizer holding them keeps working.

        Examples:
            >>> from nnsight_toolbox import LoReFT
            >>> a, b = LoReFT(model.transformer.h[0], r=4), LoReFT(model.transformer.h[0], r=4)
            >>> _ = b.load_state_dict(a.state_dict())
            >>> torch.equal(a.R, b.R)
            True
        """
        self._check_state_dict(state_dict, strict)  # the base's check: our keys are pyreft's
        with torch.no_grad():
            self.learned_source.weight.copy_(state_dict["weight"])
            self.learned_source.bias.copy_(state_dict["bias"])
            rotation = self.rotate_layer
            Rt = state_dict["rotate_layer"].to(rotation.generator.dtype).to(rotation.generator.device)
            rotation.base.copy_(complete_orthonormal(Rt))
            rotation.generator.zero_()  # exp(0) = I, so R^T = base[:, :r] exactly
        return None

    def _usual_parts(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """``(R^T, W, b)`` when ``output`` needs nothing converted or dropped out, else ``None`` (then `_parts`).

        The usual case of every forward pass, in one call: `_parts`, `_source` and
        `add_in_dtype` cost a method call each, which in batch-1 generation is a
        few percent of the formula. Checks the output's width either way.
        """
        if output.shape[-1] != self.output_dim:
            raise self._width_error(output)
        Rt = self._modules["rotate_layer"].weight  # (d, r)
        parameters = self._modules["learned_source"]._parameters
        W, b = parameters.get("weight"), parameters.get("bias")
        if W is None or b is None or output.dtype is not Rt.dtype or (self.dropout and self.training):
            return None  # a parametrized W or b is not in the table: `_source` computes it
        return Rt, W, b

    def _parts(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h, dropout(h), R^T)`` in the intervention's dtype."""
        if output.shape[-1] != self.output_dim:
            raise self._width_error(output)
        Rt = self._modules["rotate_layer"].weight  # (d, r)
        h = output if output.dtype == Rt.dtype else output.to(Rt.dtype)
        return h, (self._dropped(h) if self.dropout and self.training else h), Rt

    def _source(self, h: torch.Tensor) -> torch.Tensor:
        """``W h + b``: pyreft's ``learned_source``, computed from its tensors (no module call per forward pass)."""
        source = self._modules["learned_source"]
        return F.linear(h, own_tensor(source, "weight"), own_tensor(source, "bias"))

    def extra_repr(self) -> str:
        return ModuleIntervention.extra_repr(self)


class LoReFT(ReftBase):
    """pyreft's ``LoreftIntervention`` on a module's output: ``h + alpha * R^T (W h + b - R h)``.

    ``R`` (r, d) has orthonormal rows and stays so through training, weight
    decay included; ``W, b`` is a ``Linear(d, r)``. With dropout, ``h`` inside
    the bracket is ``dropout(h)`` (pyreft drops out the result instead).

    Args:
        module: The nnsight Envoy of the module, such as a decoder layer
            ``model.transformer.h[3]``; its output is a tensor, or a tuple whose
            first element is one.
        r: The rank of the edited subspace.
        dropout: Dropout probability on ``h`` inside the bracket, training mode only.
        dtype: The dtype of ``R``, ``W``, ``b`` and the arithmetic.
        output_dim: The width ``d``, for a module whose width cannot be inferred.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import LoReFT
        >>> reft = LoReFT(model.transformer.h[1], r=4)
        >>> optimizer = torch.optim.AdamW(reft.parameters(), lr=1e-2)
        >>> with model.trace("The Eiffel Tower is in"):
        ...     reft(positions=[0, 1, -2, -1])             # pyreft's "f2+l2"
        ...     logits = model.lm_head.output.save()
        >>> logits.sum().backward()
        >>> optimizer.step()
    """

    def intervene(self, output: torch.Tensor, x: object, alpha: float) -> torch.Tensor:
        """``output + alpha * R^T (W d(h) + b - R d(h))`` in the intervention's dtype, cast back.

        Examples:
            >>> from nnsight_toolbox import LoReFT
            >>> reft = LoReFT(model.transformer.h[1], r=4)
            >>> h = torch.randn(1, 3, 32)
            >>> torch.equal(reft.intervene(h, None, 0.0), h)
            True
        """
        usual = self._usual_parts(output)
        if usual is not None:  # `output` in the intervention's dtype, no dropout
            Rt, W, b = usual
            delta = (F.linear(output, W, b) - output @ Rt) @ Rt.T
            return output + delta if alpha == 1.0 else output + delta * alpha
        h, dh, Rt = self._parts(output)
        delta = (self._source(dh) - dh @ Rt) @ Rt.T  # ((B, T, r) - (B, T, d) @ (d, r)) @ (r, d)
        return add_in_dtype(output, delta, alpha)


def complete_orthonormal(Rt: torch.Tensor) -> torch.Tensor:
    """A (d, d) matrix whose first r columns are ``Rt`` bit for bit and whose others complete them orthonormally."""
    d, r = Rt.shape
    if r == d:
        return Rt.clone()
    generator = torch.Generator().manual_seed(0)  # deterministic: the completion is not saved
    noise = torch.randn(d, d - r, generator=generator, dtype=torch.float64).to(Rt.device)
    R64 = Rt.to(torch.float64)
    noise = noise - R64 @ (R64.T @ noise)  # project out span(Rt), then orthonormalize the rest
    rest, _ = torch.linalg.qr(noise)
    return torch.cat([Rt, rest.to(Rt.dtype)], dim=1)
