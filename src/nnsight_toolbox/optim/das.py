"""Distributed alignment search: swap a subspace of a rotated representation from a source run into a base run.

DAS (Geiger et al. 2023, "Finding Alignments Between Interpretable Causal
Variables and Distributed Neural Representations", arXiv:2303.02536) rotates a
hidden state ``h`` (d wide) with a learned orthogonal ``R`` (d, d) and swaps
some rotated coordinates of a *source* run into a *base* run; ``R`` is trained
so that the swap has the effect a causal model predicts::

    RotatedSpace             h' = h_b + R_k^T (R_k h_s - R_k h_b)       R_k: the first k rows of R
    BoundlessRotatedSpace    h' = R^T ((1 - m) * R h_b + m * R h_s)     m_i = sigmoid(i / T) * sigmoid((beta d - i) / T)
    SigmoidMaskRotatedSpace  h' = R^T ((1 - m) * R h_b + m * R h_s)     m_i = sigmoid(mask_i / T)

These are pyvene 0.1.8's ``RotatedSpaceIntervention`` (after
``set_interchange_dim(k)``), ``BoundlessRotatedSpaceIntervention`` and
``SigmoidMaskRotatedSpaceIntervention``; pyvene's ``rotate_layer.weight`` is
``R^T``. ``alpha`` scales the swap: 0 leaves the base as it is, 1 swaps fully.

In nnsight the source and the base are two invokes of one batch, so the
module's output holds both::

    with model.trace() as tracer:
        with tracer.invoke(source_prompts):
            src = das.source(positions=-1)      # the rows and tokens to read from
        with tracer.invoke(base_prompts):
            das(src, positions=-1)              # swap them into these rows and tokens

``R`` is kept orthogonal the way torch's ``orthogonal(..., "matrix_exp")`` keeps
pyvene's: ``R^T = base @ exp(skew(generator))``, with the map written out (see
`loreft.OrthonormalColumns`) because a parametrized module refuses to pickle,
and a remote request pickles the intervention. Weight decay pulls the generator
towards 0, that is ``R`` towards ``base``, which stays orthogonal.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .activation import Steps, SwapSource, activate_swap, check_alpha, normalize_steps, read_source
from .loreft import OrthonormalColumns
from .module_intervention import ModuleIntervention
from .positions import Positions, normalize_positions

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["RotationBase", "RotatedSpace", "BoundlessRotatedSpace", "SigmoidMaskRotatedSpace"]

#: pyvene's state_dict keys for the rotation (torch's orthogonal parametrisation of ``rotate_layer.weight``).
PYVENE_ORIGINAL = "rotate_layer.parametrizations.weight.original"
PYVENE_BASE = "rotate_layer.parametrizations.weight.0.base"


class RotationBase(ModuleIntervention):
    """What the rotated-space swaps share: ``R`` orthogonal ``(d, d)``, the source, the call, pyvene's state.

    A subclass implements `swap`; ``state_dict()`` holds ``rotate_layer``
    (``R^T``, materialised) plus the subclass's own tensors.

    Examples:
        >>> from nnsight_toolbox import RotatedSpace
        >>> das = RotatedSpace(model.transformer.h[1], k=8)     # a RotationBase
        >>> das.R.shape
        torch.Size([32, 32])
    """

    reads_output = True
    """The swap's backward keeps ``h``: the machinery hands it a copy it will not overwrite.

    Examples:
        >>> from nnsight_toolbox import RotatedSpace
        >>> RotatedSpace.reads_output
        True
    """

    rotate_layer: OrthonormalColumns
    """Holds ``weight`` = ``R^T`` ``(d, d)`` (pyvene's ``rotate_layer.weight``), kept orthogonal by the matrix-exponential map.

    Its trainable tensor is ``rotate_layer.generator``; ``rotate_layer.base`` is a fixed buffer.

    Examples:
        >>> from nnsight_toolbox import RotatedSpace
        >>> RotatedSpace(model.transformer.h[1], k=8).rotate_layer.weight.shape
        torch.Size([32, 32])
    """

    def __init__(self, module: Envoy, *, dtype: torch.dtype = torch.float32, output_dim: int | None = None) -> None:
        """``R`` from torch's ``orthogonal_`` init, as pyvene's ``RotateLayer``; see the subclass for the arguments."""
        ModuleIntervention.__init__(self, module, dtype=dtype, output_dim=output_dim)
        self.rotate_layer = OrthonormalColumns(self.output_dim, self.output_dim, dtype, self._device_hint)

    @property
    def R(self) -> torch.Tensor:
        """``R``, shape ``(d, d)``, orthogonal; its rows are the rotated basis (rotated coordinates ``R h``).

        Examples:
            >>> from nnsight_toolbox import RotatedSpace
            >>> R = RotatedSpace(model.transformer.h[1], k=8).R
            >>> torch.allclose(R @ R.T, torch.eye(32), atol=1e-5)
            True
        """
        return self.rotate_layer.weight.T

    def source(self, *, positions: Positions = None) -> "SwapSource":
        """Mark the running invoke's rows (and ``positions``) as the source of a swap; pass the result to the swap.

        Call it inside the source's invoke, then ``das(src, ...)`` inside the
        base's invoke of the same trace. Row ``i`` of the base pairs with row
        ``i`` of the source (a one-row source goes to every base row); the
        positions are counted over each row's own real tokens and pair in token
        order. The values are read at each forward pass from the module's own
        output on these rows, so gradients reach the source's run too.

        Args:
            positions: The tokens of each source row to read (``-1``: the last
                prompt token). ``None``: every real token, or the whole row on a
                module whose output has no token axis, ``(rows, d)``.

        Examples:
            >>> from nnsight_toolbox import RotatedSpace
            >>> das = RotatedSpace(model.transformer.h[1], k=8)
            >>> with model.trace() as tracer:
            ...     with tracer.invoke(["Paris is in", "Rome is in"]):
            ...         src = das.source(positions=-1)
            ...     with tracer.invoke(["Berlin is in", "Madrid is in"]):
            ...         das(src, positions=-1)
            ...         logits = model.lm_head.output.save()
            >>> logits.shape[0]
            2
        """
        return read_source(self.module, normalize_positions(positions), f"{type(self).__name__.lower()}.source()")

    def forward(self, source: Any = None, alpha: float = 1.0, *, steps: Steps = None, positions: Positions = None) -> None:  # type: ignore[override]
        """Swap ``source`` into the running invoke's rows (and ``positions``), from this call onward.

        Args:
            source: What `source` returned in another invoke of this trace, or
                a tensor (saved from an earlier trace), shaped
                ``(rows, positions, d)`` (``(rows, d)`` on a module with no
                token axis) or broadcastable to it.
            alpha: Scale of the swap: 0 changes nothing, 1 swaps fully.
            steps: Restrict it to some forward passes (0 is the prefill), as every kind.
            positions: The tokens of each base row to swap into, counted over
                its real tokens; the count must equal the source's, or the
                source gives one. ``None``: every real token (or the whole row).

        Examples:
            >>> from nnsight_toolbox import RotatedSpace
            >>> das = RotatedSpace(model.transformer.h[1], k=8)
            >>> with model.trace("Paris is in"):
            ...     h = model.transformer.h[1].output[:, -1:].save()   # (1, 1, 32)
            >>> with model.trace("Rome is in"):
            ...     das(h, positions=-1)
            ...     logits = model.lm_head.output.save()
        """
        what = f"{type(self).__name__.lower()}()"
        if source is None:
            raise TypeError(
                f"`{what}` needs a source: call `src = {type(self).__name__.lower()}.source(positions=...)` "
                f"inside the source's invoke and `{what[:-1]}src, positions=...)` inside the base's, or pass a "
                f"tensor of source values `(rows, positions, d)`."
            )
        if isinstance(source, torch.Tensor):
            if source.dim() == 0 or source.shape[-1] != self.output_dim:
                raise ValueError(
                    f"`{what}` on `{self.path}` was given a source tensor of shape {tuple(source.shape)}; "
                    f"its last dimension must be the module's width {self.output_dim}, as "
                    f"`(rows, positions, {self.output_dim})` or broadcastable to it."
                )
            source = source.detach() if not source.requires_grad else source
        elif not isinstance(source, SwapSource):
            raise TypeError(
                f"`{what}`'s source must be what `.source()` returned in another invoke of this trace, "
                f"or a tensor; got {type(source).__name__}."
            )
        chosen = self._positions(positions)
        alpha = check_alpha(alpha)
        steps = normalize_steps(steps)
        self._follow_module_device()
        activate_swap(self, self.module, alpha, steps, what, chosen, source)

    def intervene(self, output: torch.Tensor, x: object, alpha: float) -> torch.Tensor:
        """Refused: a swap needs a source, so it is switched on only by calling it with one.

        Examples:
            >>> from nnsight_toolbox import RotatedSpace
            >>> das = RotatedSpace(model.transformer.h[1], k=8)
            >>> try:
            ...     das.intervene(torch.zeros(1, 2, 32), None, 1.0)
            ... except TypeError as error:
            ...     print(str(error)[:40])
            `RotatedSpace` on `model.transformer.h.1
        """
        raise TypeError(
            f"`{type(self).__name__}` on `{self.path}` swaps values from a source run, so it has "
            f"no formula of the output alone. Call it with a source, `das(src, positions=...)`, "
            f"rather than through a collection that switches it on without one."
        )

    def swap(self, base: torch.Tensor, source: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """The swapped base ``(..., d)`` from base and source values of the same shape; each subclass's formula.

        Examples:
            >>> from nnsight_toolbox import RotatedSpace
            >>> das = RotatedSpace(model.transformer.h[1], k=32)      # the whole space
            >>> hb, hs = torch.randn(2, 32), torch.randn(2, 32)
            >>> torch.allclose(das.swap(hb, hs), hs, atol=1e-5)
            True
        """
        raise NotImplementedError  # pragma: no cover - every subclass has its formula

    def _rotated(self, base: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(R^T, h_b, h_s)`` in the intervention's dtype, the width checked."""
        if base.shape[-1] != self.output_dim:
            raise self._width_error(base)
        Rt = self._modules["rotate_layer"].weight  # (d, d)
        if base.dtype != Rt.dtype:
            base = base.to(Rt.dtype)
        if source.dtype != Rt.dtype or source.device != Rt.device:
            source = source.to(device=Rt.device, dtype=Rt.dtype)
        return Rt, base, source

    def _masked_swap(self, base: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, Rt: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
        """``R^T ((1 - a m) * R h_b + a m * R h_s)``, pyvene's order of operations for ``a = 1``."""
        if alpha != 1.0:
            mask = mask * alpha
        rotated_base = base @ Rt  # (..., d) @ (d, d): rotated coordinates R h
        rotated_source = source @ Rt
        mixed = (1.0 - mask) * rotated_base + mask * rotated_source
        return (mixed @ Rt.T).to(dtype)  # back from the rotated basis

    # -- state: ours (R^T materialised) or pyvene's own intervention's --

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        """The subclass's tensors besides the rotation, as saved (a float ``temperature`` as a float64 scalar)."""
        return {}

    def _load_own(self, state: Mapping[str, Any], pyvene: bool) -> None:
        """Load the subclass's tensors (checked already) from ours or pyvene's state."""

    def _own_shapes(self, pyvene: bool) -> dict[str, tuple]:
        """The subclass's keys and their shapes, in ours or pyvene's state."""
        return {}

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> "OrderedDict[str, torch.Tensor]":  # type: ignore[override]
        """``rotate_layer`` ``(d, d)`` = ``R^T`` materialised (pyvene's ``rotate_layer.weight``), plus the subclass's tensors.

        `load_state_dict` restores it bit for bit, and also takes pyvene's own
        intervention's ``state_dict()``.

        Examples:
            >>> from nnsight_toolbox import BoundlessRotatedSpace
            >>> {k: tuple(v.shape) for k, v in BoundlessRotatedSpace(model.transformer.h[1]).state_dict().items()}
            {'rotate_layer': (32, 32), 'beta': (1,), 'temperature': ()}
        """
        out = OrderedDict() if destination is None else destination
        Rt = self.rotate_layer.weight
        out[prefix + "rotate_layer"] = Rt if keep_vars else Rt.detach()
        for key, value in self._own_tensors().items():
            out[prefix + key] = value if keep_vars else value.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Load ours (`state_dict`) or pyvene 0.1.8's intervention's ``state_dict()`` of the same class.

        pyvene's rotation is torch's orthogonal parametrisation: ``rotate_layer.weight
        = base @ matrix_exp(A - A^T)`` with ``A`` the lower triangle of
        ``...weight.original``; both tensors are loaded as they are, so ``R^T``
        is pyvene's weight computed the same way. Ours loads ``R^T`` into
        ``base`` with a zero generator, bit for bit. pyvene's ``interchange_dim``
        must equal ``k`` (`RotatedSpace`). The parameters stay the same objects,
        so an optimizer holding them keeps working.

        Examples:
            >>> from nnsight_toolbox import RotatedSpace
            >>> a, b = RotatedSpace(model.transformer.h[1], k=8), RotatedSpace(model.transformer.h[1], k=8)
            >>> _ = b.load_state_dict(a.state_dict())
            >>> torch.equal(a.R, b.R)
            True
        """
        pyvene = PYVENE_ORIGINAL in state_dict or PYVENE_BASE in state_dict
        d = self.output_dim
        expected = {PYVENE_ORIGINAL: (d, d), PYVENE_BASE: (d, d)} if pyvene else {"rotate_layer": (d, d)}
        expected.update(self._own_shapes(pyvene))
        optional = {"embed_dim", "interchange_dim"} if pyvene else set()  # pyvene's buffers, checked below
        self._check_state_dict(state_dict, strict, expected, optional, also="pyvene's matching intervention")
        if pyvene and "embed_dim" in state_dict and int(state_dict["embed_dim"]) != d:
            raise ValueError(f"pyvene's `embed_dim` is {int(state_dict['embed_dim'])}, but `{self.path}` is {d} wide.")
        self._check_pyvene_extras(state_dict, pyvene)
        rotation = self.rotate_layer
        generator = rotation.generator
        with torch.no_grad():
            if pyvene:
                rotation.base.copy_(state_dict[PYVENE_BASE].to(device=generator.device, dtype=generator.dtype))
                generator.copy_(state_dict[PYVENE_ORIGINAL])  # only its lower triangle matters (its diagonal cancels)
            else:
                rotation.base.copy_(state_dict["rotate_layer"].to(device=generator.device, dtype=generator.dtype))
                generator.zero_()  # exp(0) = I, so R^T = base exactly
            self._load_own(state_dict, pyvene)
        rotation._cached = None
        return None

    def _check_pyvene_extras(self, state: Mapping[str, Any], pyvene: bool) -> None:
        """A subclass's check of pyvene's extra buffers (`RotatedSpace`: ``interchange_dim``)."""

    def extra_repr(self) -> str:
        return ModuleIntervention.extra_repr(self)


class RotatedSpace(RotationBase):
    """pyvene's ``RotatedSpaceIntervention``: swap the first ``k`` rotated coordinates of a source into the base.

    ``h' = h_b + alpha * R_k^T (R_k h_s - R_k h_b)``, with ``R`` orthogonal
    ``(d, d)`` and ``R_k`` its first ``k`` rows; equal to pyvene's class after
    ``set_interchange_dim(k)``, whose ``rotate_layer.weight`` is ``R^T``.

    Args:
        module: The nnsight Envoy of the module whose output is swapped, such as
            ``model.transformer.h[1]``: batch-first ``(rows, tokens, d)`` (swaps
            at ``positions=``) or ``(rows, d)`` (whole rows).
        k: The dimension of the swapped subspace, ``1..d``.
        dtype: The dtype of ``R`` and of the arithmetic; the result is cast back.
        output_dim: The width ``d``, for a module whose width cannot be inferred.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import RotatedSpace
        >>> das = RotatedSpace(model.transformer.h[1], k=8)
        >>> optimizer = torch.optim.AdamW(das.parameters(), lr=1e-2)
        >>> with model.trace() as tracer:
        ...     with tracer.invoke(["The Eiffel Tower is in"]):
        ...         src = das.source(positions=-1)
        ...     with tracer.invoke(["The Colosseum is in", "Big Ben is in"]):
        ...         das(src, positions=-1)          # one source row goes to both base rows
        ...         logits = model.lm_head.output.save()
        >>> logits[:, -1].logsumexp(-1).sum().backward()
        >>> optimizer.step()
    """

    k: int
    """The dimension of the swapped subspace: the first ``k`` rotated coordinates.

    Examples:
        >>> from nnsight_toolbox import RotatedSpace
        >>> RotatedSpace(model.transformer.h[1], k=8).k
        8
    """

    def __init__(self, module: Envoy, k: int, *, dtype: torch.dtype = torch.float32, output_dim: int | None = None) -> None:
        """``R`` orthogonal (pyvene's init), the subspace its first ``k`` rows; see the class for the arguments."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"`k` (the dimension of the swapped subspace) must be an int, got {k!r}. Pass e.g. `k=8`.")
        RotationBase.__init__(self, module, dtype=dtype, output_dim=output_dim)
        if not 1 <= k <= self.output_dim:
            raise ValueError(
                f"`k` (the dimension of the swapped subspace) must be in 1..{self.output_dim}, the width "
                f"of `{self.path}`, got k={k}."
            )
        self.k = k

    def swap(self, base: torch.Tensor, source: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``h_b + alpha * R_k^T (R_k h_s - R_k h_b)`` for ``(..., d)`` base and source values, in ``base``'s dtype.

        Examples:
            >>> from nnsight_toolbox import RotatedSpace
            >>> das = RotatedSpace(model.transformer.h[1], k=8)
            >>> hb, hs = torch.randn(3, 32), torch.randn(3, 32)
            >>> out = das.swap(hb, hs)
            >>> torch.allclose((out @ das.R.T)[:, :8], (hs @ das.R.T)[:, :8], atol=1e-5)   # the subspace is the source's
            True
            >>> torch.allclose((out @ das.R.T)[:, 8:], (hb @ das.R.T)[:, 8:], atol=1e-5)   # the rest the base's
            True
        """
        dtype = base.dtype
        Rt, base, source = self._rotated(base, source)
        Rk = Rt[:, : self.k]  # (d, k): the columns of R^T are the rows of R
        delta = ((source - base) @ Rk) @ Rk.T  # (..., d) @ (d, k) @ (k, d)
        out = base + delta if alpha == 1.0 else base + delta * alpha
        return out.to(dtype)

    def _check_pyvene_extras(self, state: Mapping[str, Any], pyvene: bool) -> None:
        if pyvene and "interchange_dim" in state and int(state["interchange_dim"]) != self.k:
            raise ValueError(
                f"pyvene's `interchange_dim` is {int(state['interchange_dim'])}, but this RotatedSpace has "
                f"k={self.k}. Build `RotatedSpace(module, k={int(state['interchange_dim'])})` to load it (pyvene "
                f"sets it only through `set_interchange_dim`; its constructor ignores `interchange_dim=`)."
            )


class _Tempered(RotationBase):
    """The masked swaps' temperature: a plain float the user sets on a schedule, not trained."""

    def __init__(self, module: Envoy, *, dtype: torch.dtype = torch.float32, output_dim: int | None = None) -> None:
        RotationBase.__init__(self, module, dtype=dtype, output_dim=output_dim)
        self._temperature = 50.0  # pyvene's start

    @property
    def temperature(self) -> float:
        """The mask's temperature ``T`` (starts at 50, pyvene's); lower it on a schedule as training goes.

        In pyvene it is a Parameter; here a plain float, never trained.

        Examples:
            >>> from nnsight_toolbox import BoundlessRotatedSpace
            >>> das = BoundlessRotatedSpace(model.transformer.h[1])
            >>> das.temperature = 7.5
            >>> das.temperature
            7.5
        """
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            raise ValueError(f"`temperature` must be a finite positive number, got {value!r}. Pass e.g. `das.temperature = 7.5`.")
        self._temperature = float(value)

    def _temperature_tensor(self) -> torch.Tensor:
        return torch.tensor(self._temperature, dtype=torch.float64)  # a Python float, bit for bit

    def swap(self, base: torch.Tensor, source: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``R^T ((1 - alpha m) * R h_b + alpha m * R h_s)`` for ``(..., d)`` values, in ``base``'s dtype.

        Examples:
            >>> from nnsight_toolbox import BoundlessRotatedSpace
            >>> das = BoundlessRotatedSpace(model.transformer.h[1])
            >>> hb = torch.randn(2, 32)
            >>> torch.allclose(das.swap(hb, hb), hb, atol=1e-5)      # a source equal to the base changes nothing
            True
        """
        dtype = base.dtype
        Rt, base, source = self._rotated(base, source)
        return self._masked_swap(base, source, self.mask().to(Rt.dtype), Rt, alpha, dtype)

    def mask(self) -> torch.Tensor:
        """The mask ``m`` ``(d,)`` over the rotated coordinates, between 0 and 1.

        Examples:
            >>> from nnsight_toolbox import SigmoidMaskRotatedSpace
            >>> SigmoidMaskRotatedSpace(model.transformer.h[1]).mask().shape
            torch.Size([32])
        """
        raise NotImplementedError  # pragma: no cover - every subclass has its mask


class BoundlessRotatedSpace(_Tempered):
    """pyvene's ``BoundlessRotatedSpaceIntervention``: a learned boundary ``beta`` chooses how many rotated coordinates swap.

    ``h' = R^T ((1 - m) * R h_b + m * R h_s)`` with
    ``m_i = sigmoid(i / T) * sigmoid((clamp(beta, 1e-3, 1) * d - i) / T)``,
    ``i = 0..d-1``: about the first ``beta * d`` coordinates swap. ``beta``
    (starts at 0.5) is trained; the temperature ``T`` (starts at 50) is a
    float you lower on a schedule (``das.temperature = 7.5``). ``alpha``
    scales ``m``.

    Args:
        module: The nnsight Envoy of the module whose output is swapped.
        dtype: The dtype of ``R``, ``beta`` and the arithmetic.
        output_dim: The width ``d``, for a module whose width cannot be inferred.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import BoundlessRotatedSpace
        >>> das = BoundlessRotatedSpace(model.transformer.h[1])
        >>> with model.trace() as tracer:
        ...     with tracer.invoke(["Paris is in"]):
        ...         src = das.source(positions=-1)
        ...     with tracer.invoke(["Rome is in"]):
        ...         das(src, positions=-1)
        ...         logits = model.lm_head.output.save()
        >>> logits[0, -1].sum().backward()
        >>> das.beta.grad is not None
        True
    """

    beta: torch.nn.Parameter
    """The boundary, shape ``(1,)`` (pyvene's ``intervention_boundaries``), starts at 0.5: the fraction of ``d`` that swaps.

    Examples:
        >>> from nnsight_toolbox import BoundlessRotatedSpace
        >>> BoundlessRotatedSpace(model.transformer.h[1]).beta
        Parameter containing:
        tensor([0.5000], requires_grad=True)
    """

    def __init__(self, module: Envoy, *, dtype: torch.dtype = torch.float32, output_dim: int | None = None) -> None:
        """``R`` orthogonal, ``beta = 0.5``, ``T = 50``, as pyvene's; see the class for the arguments."""
        _Tempered.__init__(self, module, dtype=dtype, output_dim=output_dim)
        self.beta = torch.nn.Parameter(torch.tensor([0.5], dtype=dtype, device=self._device_hint))

    def mask(self) -> torch.Tensor:
        """``m_i = sigmoid(i / T) * sigmoid((clamp(beta, 1e-3, 1) * d - i) / T)``, ``(d,)``.

        Examples:
            >>> from nnsight_toolbox import BoundlessRotatedSpace
            >>> das = BoundlessRotatedSpace(model.transformer.h[1])
            >>> das.temperature = 0.1                        # nearly a hard boundary at beta * d = 16
            >>> (das.mask() > 0.5).sum().item()
            15
        """
        beta = self._parameters["beta"]
        population = torch.arange(self.output_dim, device=beta.device).to(beta.dtype)  # (d,) coordinate indices
        upper = torch.clamp(beta, 1e-3, 1)[0] * self.output_dim
        T = self._temperature
        return torch.sigmoid((population - 0.0) / T) * torch.sigmoid((upper - population) / T)  # pyvene's sigmoid_boundary

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        return {"beta": self.beta, "temperature": self._temperature_tensor()}

    def _own_shapes(self, pyvene: bool) -> dict[str, tuple]:
        if pyvene:
            return {"intervention_boundaries": (1,), "temperature": (), "intervention_population": (self.output_dim,)}
        return {"beta": (1,), "temperature": ()}

    def _check_pyvene_extras(self, state: Mapping[str, Any], pyvene: bool) -> None:
        if pyvene and not torch.equal(state["intervention_population"].to(torch.long).cpu(), torch.arange(self.output_dim)):
            raise ValueError("pyvene's `intervention_population` is not 0..d-1, which the mask here assumes; it cannot load.")

    def _load_own(self, state: Mapping[str, Any], pyvene: bool) -> None:
        self.beta.copy_(state["intervention_boundaries" if pyvene else "beta"])
        self.temperature = float(state["temperature"])


class SigmoidMaskRotatedSpace(_Tempered):
    """pyvene's ``SigmoidMaskRotatedSpaceIntervention``: a learned mask per rotated coordinate.

    ``h' = R^T ((1 - m) * R h_b + m * R h_s)`` with ``m_i = sigmoid(masks_i / T)``;
    ``masks`` starts at 100 (every coordinate swaps, about), ``T`` at 50.

    Args:
        module: The nnsight Envoy of the module whose output is swapped.
        dtype: The dtype of ``R``, ``masks`` and the arithmetic.
        output_dim: The width ``d``, for a module whose width cannot be inferred.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import SigmoidMaskRotatedSpace
        >>> das = SigmoidMaskRotatedSpace(model.transformer.h[1])
        >>> with model.trace() as tracer:
        ...     with tracer.invoke(["Paris is in"]):
        ...         src = das.source(positions=-1)
        ...     with tracer.invoke(["Rome is in"]):
        ...         das(src, positions=-1)
        ...         logits = model.lm_head.output.save()
    """

    masks: torch.nn.Parameter
    """The mask's logits, shape ``(d,)``, starting at 100 (pyvene's).

    Examples:
        >>> from nnsight_toolbox import SigmoidMaskRotatedSpace
        >>> SigmoidMaskRotatedSpace(model.transformer.h[1]).masks.shape
        torch.Size([32])
    """

    def __init__(self, module: Envoy, *, dtype: torch.dtype = torch.float32, output_dim: int | None = None) -> None:
        """``R`` orthogonal, ``masks = 100``, ``T = 50``, as pyvene's; see the class for the arguments."""
        _Tempered.__init__(self, module, dtype=dtype, output_dim=output_dim)
        self.masks = torch.nn.Parameter(torch.full((self.output_dim,), 100.0, dtype=dtype, device=self._device_hint))

    def mask(self) -> torch.Tensor:
        """``sigmoid(masks / T)``, ``(d,)``.

        Examples:
            >>> from nnsight_toolbox import SigmoidMaskRotatedSpace
            >>> round(SigmoidMaskRotatedSpace(model.transformer.h[1]).mask()[0].item(), 4)   # sigmoid(100 / 50)
            0.8808
        """
        return torch.sigmoid(self._parameters["masks"] / self._temperature)

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        return {"masks": self.masks, "temperature": self._temperature_tensor()}

    def _own_shapes(self, pyvene: bool) -> dict[str, tuple]:
        return {"masks": (self.output_dim,), "temperature": ()}

    def _load_own(self, state: Mapping[str, Any], pyvene: bool) -> None:
        self.masks.copy_(state["masks"])
        self.temperature = float(state["temperature"])
