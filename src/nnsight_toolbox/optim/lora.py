"""`LORA`: a low-rank adapter on any module, trained and applied inside nnsight traces.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) adds a trainable low-rank term to a module's output while
the module itself stays frozen::

        x (B, T, input_dim) ───────────────► module ──► out (B, T, output_dim)
          │                                               │
          └─► dropout ─► @ WA ─► * alpha ─► @ WB ───────► + ──► out + alpha * (x @ WA @ WB)
                     (input_dim, r)    (r, output_dim)

``WA`` starts kaiming-uniform and ``WB`` at zero (Section 4.1 of the paper), so
a fresh adapter changes nothing until it is trained. Calling ``lora()`` inside
a trace switches it on for that run: every forward pass of it (each generation
step too), on the rows of the invoke it was called in. See
`nnsight_toolbox.optim.activation` for how.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .activation import Steps
from .adapter_set import LoraSet, adapters_on
from .dims import ModuleDims, infer_dims
from .module_intervention import ModuleIntervention, check_envoy, dtype_name
from .positions import PositionSpec, Positions, normalize_positions
from .targets import Layers, Targets

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["LORA"]

#: From this many output elements, `LORA.add_delta` folds the sum into the second
#: matmul (``addmm``): it saves a pass over the output, which outweighs the cost of
#: the reshapes ``addmm`` needs. Below it (one token at a time, in generation) it does not.
FUSE_MIN_ELEMENTS = 1 << 14


class LORA(ModuleIntervention):
    """A trainable low-rank adapter on one module of an nnsight model.

    Inside a trace, ``lora(alpha)`` replaces the module's output with
    ``output + alpha * (dropout(input) @ WA @ WB)``, where ``input`` is the
    module's first input (what ``module.input`` returns) and, for a tuple output,
    ``output`` is its first element. The arithmetic runs in the adapter's dtype
    and the sum is cast back to the output's dtype.

    Args:
        module: The nnsight Envoy of the module to adapt, such as
            ``model.transformer.h[0].mlp``. Any module whose first input and
            output are tensors works: a Linear, an MLP block, a decoder layer,
            an attention module with a tuple output, or an ``nn.Embedding``
            (whose delta looks up rows of ``WA`` by token id).
        r: The rank, a positive int.
        dropout: Dropout probability on the adapter's input, applied only in
            training mode (``lora.train()``, the default; ``lora.eval()`` turns it off).
        dtype: The dtype of ``WA`` and ``WB``. float32 by default, even for a
            bf16 model, as PEFT does.
        input_dim: The input width, for a module whose widths cannot be inferred
            (no known weight, and no tokenizer to scan the model with).
        output_dim: The output width, likewise.
        bias: Whether the low-rank term carries a trainable bias of width
            ``output_dim``, added with it and scaled by ``alpha`` too (PEFT's
            ``lora_bias=True``, a bias on ``lora_B``). Off by default.

    Attributes:
        module: The Envoy the adapter acts on.
        r: The rank.
        WA: ``torch.nn.Parameter`` of shape ``(input_dim, r)``.
        WB: ``torch.nn.Parameter`` of shape ``(r, output_dim)``.
        input_dim: Width of the module's first input.
        output_dim: Width of the module's output.
        dropout: Dropout probability on the adapter's input.
        takes_ids: Whether the module is an embedding, whose input is token ids.
        bias: ``torch.nn.Parameter`` of shape ``(output_dim,)`` with ``bias=True``, else ``None``.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> lora = LORA(model.transformer.h[0].mlp, r=8)
        >>> optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-2)
        >>> with model.trace("The Eiffel Tower is in"):
        ...     lora()
        ...     logits = model.lm_head.output.save()
        >>> logits.sum().backward()     # gradients reach lora.WA and lora.WB
    """

    reads_input = True  # the delta is computed from the module's first input
    call_name = "lora()"
    alpha_means = "the scale of the low-rank term"

    # Instance attributes, declared here so that each has its own entry in the
    # API reference (the documentation tools read these docstrings; Python does not).

    module: Envoy
    """The nnsight Envoy of the adapted module, as passed to the constructor.

    Examples:
        >>> lora.module.path
        'model.transformer.h.0.mlp'
    """

    r: int
    """The rank: the inner width of ``WA @ WB``.

    Examples:
        >>> lora.r
        8
    """

    WA: torch.nn.Parameter
    """The first factor, shape ``(input_dim, r)``; PEFT's ``lora_A.weight`` is its transpose.

    Starts kaiming-uniform, as PEFT's ``lora_A`` does. For an ``nn.Embedding``
    its rows are looked up by token id instead of multiplied.

    Examples:
        >>> lora.WA.shape          # (input_dim, r): GPT-2's MLP block takes the hidden width
        torch.Size([32, 8])
    """

    WB: torch.nn.Parameter
    """The second factor, shape ``(r, output_dim)``; PEFT's ``lora_B.weight`` is its transpose.

    Starts at zero, so a fresh adapter changes nothing until it is trained.

    Examples:
        >>> lora.WB.shape          # (r, output_dim)
        torch.Size([8, 32])
        >>> bool(lora.WB.eq(0).all())
        True
    """

    input_dim: int
    """Width of the module's first input (the vocabulary size for an embedding).

    Examples:
        >>> lora.input_dim == lora.WA.shape[0]
        True
    """

    output_dim: int
    """Width of the module's output (of its first element, for a tuple output).

    Examples:
        >>> lora.output_dim == lora.WB.shape[1]
        True
    """

    dropout: float
    """Dropout probability on the adapter's input, applied only in training mode.

    Examples:
        >>> LORA(model.transformer.h[0].mlp, r=8, dropout=0.1).dropout
        0.1
    """

    takes_ids: bool
    """Whether the module is an ``nn.Embedding``: its input is token ids, and ``WA`` is looked up by id.

    Examples:
        >>> LORA(model.transformer.wte, r=8).takes_ids
        True
    """

    bias: torch.nn.Parameter | None
    """The low-rank term's bias ``(output_dim,)`` (PEFT's ``lora_B.bias``), or ``None`` without ``bias=True``.

    Starts at zero, as PEFT's does.

    Examples:
        >>> LORA(model.transformer.h[0].mlp.c_fc, r=8, bias=True).bias.shape
        torch.Size([128])
        >>> LORA(model.transformer.h[0].mlp.c_fc, r=8).bias is None
        True
    """

    # The merge record belongs to this object alone: a copy is never merged, so
    # exactly one object can take a merge back out (see `Optimization.__deepcopy__`).
    _not_copied = ("_merge_record",)

    def __init__(
        self,
        module: Envoy,
        r: int,
        *old_positional: Any,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        input_dim: int | None = None,
        output_dim: int | None = None,
        bias: bool = False,
    ) -> None:
        """An adapter of rank ``r`` on ``module``; see the class for the arguments.

        ``WA`` and ``WB`` take the widths inferred from the module and start
        as PEFT's do, so the adapter changes nothing until trained. Only
        ``module`` and ``r`` are positional: ``old_positional`` exists to
        refuse the form ``LORA(module, dim, r)`` of nnsight's LoRA tutorial
        with a `TypeError` that shows this one.
        """
        if old_positional:
            raise _old_form_error(r, old_positional)
        kind = type(self).__name__
        check_envoy(module, kind)
        _check_rank(r)
        if not isinstance(bias, bool):
            raise TypeError(f"`{kind}`'s `bias` must be True or False, got {bias!r}.")
        dims = _resolve_dims(module, input_dim, output_dim, kind)
        ModuleIntervention.__init__(self, module, dropout=dropout, dtype=dtype, output_dim=dims.output_dim)
        self.r = r
        self.input_dim = dims.input_dim
        self.takes_ids = dims.takes_ids
        device = self._device_hint
        self.WA = torch.nn.Parameter(torch.empty(dims.input_dim, r, device=device, dtype=dtype))
        self.WB = torch.nn.Parameter(torch.zeros(r, dims.output_dim, device=device, dtype=dtype))
        # A plain bool, read first thing in `add_delta`: an instance-dict hit, so the
        # usual unbiased adapter pays nothing for the option.
        self._has_bias = bias
        self.register_parameter("bias", torch.nn.Parameter(torch.zeros(dims.output_dim, device=device, dtype=dtype)) if bias else None)
        self._merge_record = None  # set while merged into the module's weight (see `merge`)
        self.reset_parameters()

    @classmethod
    def on(
        cls,
        model: Envoy,
        targets: Targets,
        *,
        r: int,
        layers: Layers = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> LoraSet:
        """One adapter of this class on every module of ``model`` that ``targets`` picks, as one `LoraSet`.

        PEFT's matching rule: a string is a regex that must match the whole
        module path; a list matches a path equal to an entry or ending in ``"."``
        plus it. ``layers=`` keeps only those layer indices. See `LoraSet.on`.
        ``DoRA.on(...)`` builds `DoRA` adapters the same way.

        Examples:
            >>> adapters = LORA.on(model, ["c_attn", "c_fc"], r=16)  # every layer's c_attn and c_fc
            >>> optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
            >>> with model.trace("Hello"):
            ...     adapters()
        """
        return LoraSet(adapters_on(cls, model, targets, r=r, layers=layers, dropout=dropout, dtype=dtype))

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments besides ``module``, as JSON values: what `save` records.

        Examples:
            >>> LORA(model.transformer.h[0].mlp.c_fc, r=4).config()
            {'r': 4, 'dropout': 0.0, 'dtype': 'float32', 'input_dim': 32, 'output_dim': 128}
        """
        config = {"r": self.r, "dropout": self.dropout, "dtype": dtype_name(self.dtype), "input_dim": self.input_dim, "output_dim": self.output_dim}
        if self._has_bias:
            config["bias"] = True
        return config

    def reset_parameters(self) -> None:
        """Re-initialise: ``WA`` kaiming-uniform with a=sqrt(5), ``WB`` (and ``bias``) zeros.

        This is PEFT's initialisation of ``lora_A`` (whose weight is ``WA.T``, so
        the fan-in is ``input_dim``): uniform on ``[-1/sqrt(input_dim), 1/sqrt(input_dim)]``.

        Examples:
            >>> lora.reset_parameters()   # back to an adapter that changes nothing
        """
        bound = 1.0 / math.sqrt(self.input_dim)
        with torch.no_grad():
            self.WA.uniform_(-bound, bound)
            self.WB.zero_()
            if self.bias is not None:
                self.bias.zero_()  # PEFT zeroes `lora_B.bias` with `lora_B.weight`

    def forward(self, alpha: float = 1.0, *, steps: Steps = None, positions: Positions = None) -> None:
        """``lora(alpha=1.0)``: switch the adapter on for the running trace, from this call onward.

        You call the adapter itself (``lora(...)``, which runs this method) inside
        ``model.trace(...)``, ``model.generate(...)`` or a ``tracer.invoke(...)``.
        It acts on every forward pass of the run, so in ``model.generate(...)`` on
        the prefill and every generated token, with no ``tracer.all()`` loop.
        Only the rows of the invoke it is called in are adapted. Calling it again
        in the same invoke updates ``alpha``/``steps`` and never applies it twice.
        Code after the call runs as usual and sees the adapted values.

        Args:
            alpha: Scale of the low-rank term; a finite number. 0 switches the
                adapter off for this invoke. Or a 1-D sequence or tensor of
                them, one per row of the invoke (``torch.linspace(0, 2, 16)`` in
                an invoke of 16 prompts): a sweep of strengths in one batch, at
                about the cost of one. Its length must be the invoke's rows.
            steps: Restrict it to some forward passes of the run: an int, a
                ``slice`` (``slice(1, None)``: every generated token but not the
                prefill), a ``range`` or an iterable of ints. Pass 0 is the
                prefill (or the only pass of a ``model.trace``).
            positions: Restrict it to some tokens of each row: an int, a list of
                ints or a ``slice``, counted over the row's real tokens (padding
                never counts). 0 is the first prompt token, -1 the last; in
                generation the new tokens continue the count, so ``slice(-1, None)``
                is the last prompt token and every generated one. ``None`` (the
                default): every token. See `nnsight_toolbox.optim.positions`.

        While the adapter is merged into the weights (`merge`), calling it raises
        a `RuntimeError`: the delta is already in every row of every run, so it
        can neither be added again nor be limited to one invoke.

        Raises:
            RuntimeError: Called outside a trace, in a trace of another model, by
                two invokes of one run whose rows overlap, or while merged.
            ValueError: ``alpha`` is not a finite number (nor one per row of the
                invoke, each finite, as many as its rows), ``steps`` holds
                something other than non-negative ints, or ``positions`` picks a
                token some row of the invoke does not have.

        Examples:
            >>> with model.generate("Hello", max_new_tokens=5) as tracer:
            ...     lora(alpha=2.0)
            ...     ids = tracer.result.save()

            One batch, one invoke adapted and one not:

            >>> with model.trace() as tracer:
            ...     with tracer.invoke("Hello"):
            ...         lora()
            ...         adapted = model.lm_head.output.save()
            ...     with tracer.invoke("Hello"):
            ...         base = model.lm_head.output.save()

            Only the last prompt token and the tokens generated after it:

            >>> with model.generate("Hello", max_new_tokens=5) as tracer:
            ...     lora(positions=slice(-1, None))
            ...     ids = tracer.result.save()

            One adapter at 16 strengths, one per row, in one forward:

            >>> with model.trace(["Hello"] * 16):
            ...     lora(alpha=torch.linspace(0, 2, 16))
            ...     sweep = model.lm_head.output.save()
            >>> sweep.shape[0]
            16

            Many adapters side by side, one per invoke, applied as one batched
            computation on their module (see `nnsight_toolbox.optim.grouped`):

            >>> checkpoints = [LORA(model.transformer.h[0].mlp, r=8) for _ in range(3)]
            >>> with model.trace() as tracer:
            ...     for k in range(3):
            ...         with tracer.invoke("Hello"):
            ...             checkpoints[k]()
            ...     with tracer.invoke():
            ...         logits = model.lm_head.output.save()
            >>> logits.shape[0]
            3
        """
        self._activate(alpha, steps, positions, self.call_name)

    def _positions(self, positions: Positions) -> PositionSpec | None:
        """`Optimization._positions`, refusing while merged (`merge`)."""
        if self.merged:
            raise RuntimeError(
                f"The adapter on `{self.path}` is merged into the weights (alpha="
                f"{self._merge_record.alpha}), so the model already computes it for every "
                f"row of every run; `{self.call_name}` would add it a second time. Drop the call, or "
                f"call `{self.call_name[:-2]}.unmerge()` first to apply it per invoke again."
            )
        return normalize_positions(positions)

    def delta(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``alpha * (dropout(x) @ WA @ WB + bias)`` in the adapter's dtype: the term ``lora()`` adds.

        Args:
            x: The module's first input, ``(..., input_dim)``, or token ids for an embedding.
            alpha: Scale of the term.

        Examples:
            >>> x = torch.randn(1, 4, lora.input_dim)
            >>> lora.delta(x).shape[-1] == lora.output_dim
            True
        """
        WA, WB = self._factors()
        delta = self._up(self._down(x, WA), WB, alpha)
        return delta + alpha * self.bias if self._has_bias else delta

    def add_delta(self, output: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``output + alpha * delta(x)``, summed in the adapter's dtype and rounded once to ``output``'s.

        What ``lora()`` does to the module's output, in as few kernels as the
        dtypes allow: when ``output`` has the adapter's dtype, the second matmul
        and the sum are one ``addmm`` (for outputs of `FUSE_MIN_ELEMENTS` or more);
        otherwise a matmul, then an add that computes in the adapter's dtype
        and, outside autograd, writes the output's dtype directly (PEFT's
        cast-up, add, cast-back, with one rounding).

        Args:
            output: The module's output, ``(..., output_dim)``.
            x: The module's first input, as for `delta`.
            alpha: Scale of the low-rank term.

        Examples:
            >>> x, out = torch.randn(1, 4, lora.input_dim), torch.randn(1, 4, lora.output_dim)
            >>> torch.allclose(lora.add_delta(out, x, 0.5), out + lora.delta(x, 0.5))
            True
        """
        # The usual case (one dtype, a small output, no dropout or bias) first, written out:
        # this runs on every forward pass of every adapted module, and in batch-1 generation
        # each method call or dtype read costs a few percent of the arithmetic. dtypes are
        # singletons, so `is` compares them. Anything else, or an input of another width
        # (the matmul raises), takes `_add_delta`, which converts or explains.
        parameters = self._parameters
        WA, WB = parameters.get("WA"), parameters.get("WB")
        if WA is not None and WB is not None and x.dtype is WA.dtype and output.dtype is WA.dtype:
            if not (self._has_bias or self.takes_ids or (self.dropout and self.training)) and output.numel() < FUSE_MIN_ELEMENTS:
                try:
                    delta = (x @ WA if alpha == 1.0 else (x @ WA) * alpha) @ WB
                except RuntimeError:
                    delta = None
                if delta is not None and delta.shape == output.shape:
                    return output + delta
        return self._add_delta(output, x, alpha)

    def _add_delta(self, output: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """`add_delta` in general: mixed dtypes, the fused ``addmm``, dropout, a bias, token ids, and the errors."""
        if self._has_bias:
            return self._add_biased_delta(output, x, alpha)
        WA, WB = self._factors()
        hidden = self._down(x, WA)  # (..., r)
        if output.dtype == WB.dtype and output.numel() >= FUSE_MIN_ELEMENTS:
            if output.shape[:-1] != hidden.shape[:-1] or output.shape[-1] != WB.shape[1]:
                raise self._mismatch(output, hidden.shape[:-1])
            # (N, out) + alpha * (N, r) @ (r, out): BLAS adds the product to `output` in the same pass
            flat = torch.addmm(output.reshape(-1, WB.shape[1]), hidden.reshape(-1, self.r), WB, alpha=alpha)
            return flat.view_as(output)
        delta = self._up(hidden, WB, alpha)  # in the adapter's dtype
        if delta.shape != output.shape:
            raise self._mismatch(output, delta.shape[:-1])
        if output.dtype == delta.dtype:
            return output + delta
        if torch.is_grad_enabled() and (delta.requires_grad or output.requires_grad):
            return (output + delta).to(output.dtype)
        # Nothing to differentiate: the add computes in the wider dtype and writes the output's.
        return torch.add(output, delta, out=torch.empty_like(output))

    intervene = add_delta
    """What the activation machinery calls on every forward pass: `add_delta` (see `Optimization.intervene`).

    Examples:
        >>> x, out = torch.randn(1, 4, lora.input_dim), torch.randn(1, 4, lora.output_dim)
        >>> torch.equal(lora.intervene(out, x, 0.5), lora.add_delta(out, x, 0.5))
        True
    """

    # -- many adapters on one module in one batch: one computation (see `grouped`) -------

    def _grouped_key(self) -> Any:
        """What members of one group share (`grouped`): ``None`` where this adapter goes one by one."""
        parameters = self._parameters
        WA = parameters.get("WA")
        if self.takes_ids or WA is None or parameters.get("WB") is None:  # token ids, or a parametrization
            return None
        return (self.r, self.input_dim, self.output_dim, WA.dtype, WA.device, self._has_bias, self.dropout)

    def _grouped_parameters(self) -> tuple[torch.Tensor, ...]:
        """The tensors `grouped` stacks: ``WA``, ``WB`` (and ``bias``)."""
        parameters = self._parameters
        if self._has_bias:
            return parameters["WA"], parameters["WB"], parameters["bias"]
        return parameters["WA"], parameters["WB"]

    def _grouped_intervene(
        self, output: torch.Tensor, x: torch.Tensor, stacked: tuple, member: torch.Tensor | None, rows: torch.Tensor | None, scale: torch.Tensor | None
    ) -> torch.Tensor:
        """Every group member's ``output + alpha * delta(x)`` on its rows at once: ``(B, T, out)`` from ``(B, T, in)``.

        Each acted row m gets its member's factors (a gather of the stack), and
        the two matmuls are batched over rows: ``x (M, T, in) @ WA (M, in, r)``,
        scaled per row (or token), ``@ WB (M, r, out)``. Summed in the adapters'
        dtype and cast back to the output's, as `add_delta` does.
        """
        WA, WB = stacked[0], stacked[1]
        bias = stacked[2] if len(stacked) > 2 else None
        if member is not None:
            WA, WB = WA.index_select(0, member), WB.index_select(0, member)
            bias = bias.index_select(0, member) if bias is not None else None
        picked = x if rows is None else x.index_select(0, rows)
        if picked.dtype is not WA.dtype:
            picked = picked.to(WA.dtype)
        if self.dropout and self.training:
            picked = F.dropout(picked, self.dropout, training=True)
        hidden = torch.bmm(picked, WA)  # (M, T, r)
        if scale is not None:
            scale = scale[:, None, None] if scale.dim() == 1 else scale[:, :, None]
            hidden = hidden * scale
        same = output.dtype is WA.dtype
        if rows is None and same and bias is None:
            return torch.baddbmm(output, hidden, WB)  # the sum in the second matmul's pass
        delta = torch.bmm(hidden, WB)  # (M, T, out)
        if bias is not None:
            delta = delta + (bias[:, None, :] if scale is None else bias[:, None, :] * scale)
        if rows is None:
            return output + delta if same else (output.to(delta.dtype) + delta).to(output.dtype)
        if same:
            return output.index_add(0, rows, delta)
        changed = output.index_select(0, rows).to(delta.dtype) + delta
        return output.index_copy(0, rows, changed.to(output.dtype))

    def _add_biased_delta(self, output: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """`add_delta` with a bias: PEFT's ``lora_B(lora_A(x)) * scaling``, whose ``lora_B`` is biased."""
        delta = self.delta(x, alpha)  # alpha * (x @ WA @ WB + bias), in the adapter's dtype
        if delta.shape != output.shape:
            raise self._mismatch(output, delta.shape[:-1])
        return output + delta if output.dtype == delta.dtype else (output + delta).to(output.dtype)

    def _mismatch(self, output: torch.Tensor, leading: torch.Size) -> ValueError:
        return ValueError(
            f"The adapter's output would have shape {(*leading, self.WB.shape[1])} (WB "
            f"has shape {tuple(self.WB.shape)}), which does not match the output of "
            f"`{self.path}`, whose shape is {tuple(output.shape)}. Was the adapter "
            f"built for another module? Build a new one on this module."
        )

    def _factors(self) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        """``(WA, WB)``, read from the parameter table directly where they live there.

        ``self.WA`` goes through ``nn.Module.__getattr__``, about 2 µs a lookup,
        and the delta runs on every forward of every adapted module: in batch-1
        generation that is most of what the arithmetic itself costs.
        """
        parameters = self._parameters
        WA, WB = parameters.get("WA"), parameters.get("WB")
        if WA is None or WB is None:  # a parametrization (torch.nn.utils.parametrize) computes it
            return self.WA, self.WB
        return WA, WB

    def _down(self, x: torch.Tensor, WA: torch.Tensor) -> torch.Tensor:
        """The r-wide half, ``dropout(x) @ WA`` (or ``WA[x]`` for token ids), in the adapter's dtype."""
        if x.dtype == WA.dtype and x.shape[-1] == WA.shape[0] and not self.takes_ids and not (self.dropout and self.training):
            return x @ WA  # the usual case, with nothing to check or convert
        if self.takes_ids:
            if x.is_floating_point():
                raise TypeError(
                    f"The adapter on `{self.path}` looks up token ids, but the module "
                    f"was given a {x.dtype} tensor of shape {tuple(x.shape)}."
                )
            return F.embedding(x, WA)  # (B, T) -> (B, T, r)
        if x.shape[-1] != WA.shape[0]:
            raise ValueError(
                f"The input of `{self.path}` has shape {tuple(x.shape)}, but the "
                f"adapter's WA has shape {tuple(WA.shape)}: its first dimension "
                f"must equal the input's last. Was the adapter built for another "
                f"module? Build a new one on this module."
            )
        if x.dtype != WA.dtype:
            x = x.to(WA.dtype)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        return x @ WA  # (B, T, in) @ (in, r) -> (B, T, r)

    @staticmethod
    def _up(hidden: torch.Tensor, WB: torch.Tensor, alpha: float) -> torch.Tensor:
        """``alpha * hidden @ WB``: scaling the r-wide term is cheaper than scaling the output."""
        return (hidden if alpha == 1.0 else hidden * alpha) @ WB  # (B, T, r) @ (r, out) -> (B, T, out)

    # -- merging: the work lives in `nnsight_toolbox.artifacts.merging` -------------

    @property
    def merged(self) -> bool:
        """Whether the adapter is merged into its module's weight (`merge`).

        Examples:
            >>> c_fc = LORA(model.transformer.h[0].mlp.c_fc, r=8)
            >>> c_fc.merged
            False
            >>> c_fc.merge()
            >>> c_fc.merged
            True
            >>> c_fc.unmerge()
        """
        return self._merge_record is not None

    def merge(self, alpha: float = 1.0) -> None:
        """Fold ``alpha * WA @ WB`` into the weight of the module (Linear, Conv1D or Embedding).

        The model then computes the adapted function at the base model's speed, in
        every run and every row, with no ``lora()`` call (which raises while merged).
        The delta is formed in float32 and rounded once to the weight's dtype. A
        second merge is refused (`RuntimeError`); so is one that would write NaN/Inf
        (`ValueError`, weight untouched), and one on a block (`TypeError`). Dropout
        is not applied. Keeps a CPU copy of the weight so `unmerge` is bit-exact.
        An adapter with a ``bias`` adds ``alpha * bias`` to the layer's bias, as
        PEFT does, and is refused (`RuntimeError`) on a layer without one. A `DoRA`
        adapter writes PEFT's DoRA weight, ``m / ||W + alpha * dW||_row * (W + alpha * dW)``.

        Examples:
            >>> c_fc = LORA(model.transformer.h[0].mlp.c_fc, r=8)   # a Conv1D layer: it has a weight
            >>> c_fc.merge(alpha=2.0)
            >>> with model.generate("Hello", max_new_tokens=5) as tracer:
            ...     ids = tracer.result.save()     # no `c_fc()` call: the weight carries it
            >>> c_fc.unmerge()
        """
        from ..artifacts.merging import merge_lora

        merge_lora(self, alpha)

    def unmerge(self) -> None:
        """Take the merged delta back out: the weight returns to its exact original bits.

        If the weight changed since the merge in any bit (say, another adapter was
        merged into the same layer after this one), the delta is subtracted in
        float32 instead, with a warning; that is exact only up to rounding. Only
        the adapter that merged can unmerge: a copy of it (``copy.deepcopy``) is
        not merged, so the delta never leaves twice.

        Examples:
            >>> c_fc = LORA(model.transformer.h[0].mlp.c_fc, r=8)
            >>> before = model.transformer.h[0].mlp.c_fc.weight.clone()
            >>> c_fc.merge()
            >>> c_fc.unmerge()
            >>> torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)
            True
        """
        from ..artifacts.merging import unmerge_lora

        unmerge_lora(self)

    def _merged_weight(self, kind: str, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged weight in float32 from the layer's ``weight`` and ``delta`` (both float32, laid out
        like the weight), and the per-output factor `unmerge` must divide out first (`DoRA`'s), or ``None``."""
        return weight + delta, None

    def extra_repr(self) -> str:
        return (
            f"{self.path}, input_dim={self.input_dim}, output_dim={self.output_dim}, "
            f"r={self.r}, dropout={self.dropout}, dtype={self.WA.dtype}" + (", bias=True" if self._has_bias else "")
        )


def _old_form_error(dim: Any, rest: tuple) -> TypeError:
    shown = ", ".join(repr(value) for value in (dim, *rest))
    return TypeError(
        f"`LORA` takes `LORA(module, r, *, dropout=0.0, dtype=torch.float32, input_dim=None, "
        f"output_dim=None)`, but got {2 + len(rest)} positional arguments: `LORA(module, {shown})`. "
        f"That is the form `LORA(module, dim, r)` of nnsight's LoRA tutorial: the widths are now "
        f"inferred from the module, so write `LORA(module, r={rest[-1]!r})`, and pass "
        f"`input_dim=`/`output_dim=` only for a module whose widths cannot be inferred. "
        f"See the documentation's page 'Coming from the old toolbox' (docs/migration.md)."
    )


def _check_rank(r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"`r` (the rank) must be a positive int, got {r!r}. Pass e.g. `r=8`.")


def _resolve_dims(module: Envoy, input_dim: int | None, output_dim: int | None, kind: str) -> ModuleDims:
    for name, value in (("input_dim", input_dim), ("output_dim", output_dim)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{kind}`'s `{name}` must be a positive int, got {value!r}.")
    if input_dim is not None and output_dim is not None:
        return ModuleDims(input_dim, output_dim, isinstance(module._module, torch.nn.Embedding))
    inferred = infer_dims(module, kind=kind)
    return ModuleDims(
        input_dim if input_dim is not None else inferred.input_dim,
        output_dim if output_dim is not None else inferred.output_dim,
        inferred.takes_ids,
    )
