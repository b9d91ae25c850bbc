"""`ModuleCopy`: a trained copy of a module whose output replaces the module's own.

PEFT's ``modules_to_save`` trains full copies of some modules (a classification
head, ``lm_head``, a norm) beside the low-rank adapters, and saves their whole
``state_dict`` (``ModulesToSaveWrapper`` in ``peft/utils/other.py``). Here such a
copy is an intervention like any other::

    x ──► module ──► out                    (the model's own weights, untouched)
    x ──► copy   ──► out' ──► out + alpha * (out' - out)     on the invoke's rows

so ``copy(alpha=1)`` swaps in the trained module for the rows of the invoke it
is called in, and ``alpha`` between 0 and 1 blends the two outputs.

The copy sees only the module's first input, so the module must compute its
output from that alone: its ``forward`` must take one argument (and at most a
catch-all ``**kwargs``), as a Linear, Conv1D, Embedding, a norm or a
classification head does. A decoder layer or an attention module, which take
masks and positions beside it, is refused when the copy is built.
"""

from __future__ import annotations

import copy as copy_module
import hashlib
import inspect
import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..artifacts.layers import hf_name
from .activation import Steps, check_alpha
from .dims import first_tensor
from .module_intervention import ModuleIntervention, check_envoy
from .positions import PositionSpec, Positions, normalize_positions

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["ModuleCopy"]


class ModuleCopy(ModuleIntervention):
    """A trainable copy of one module; called in a trace, its output replaces the module's.

    This is what `import_peft` builds for each of PEFT's ``modules_to_save``.
    Built on a module, it starts as an exact copy (so it changes nothing until
    trained); every parameter of the copy is trainable.

    Args:
        module: The Envoy of a module whose output depends on its first input
            only (``nn.Linear``, ``nn.Embedding``, a norm, a classification head).

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> head = ModuleCopy(model.lm_head)
        >>> optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
        >>> with model.trace("Hello"):
        ...     head()                                   # the copy computes the logits of this invoke
        ...     logits = model.lm_head.output.save()
        >>> logits.sum().backward()
        >>> head.copy.weight.grad.shape
        torch.Size([257, 32])
    """

    reads_input = True  # the copy computes its output from the module's first input
    call_name = "copy()"
    alpha_means = "1 replaces the module's output with the copy's, 0 keeps its own"

    module: Envoy
    """The nnsight Envoy of the module the copy stands in for.

    Examples:
        >>> ModuleCopy(model.lm_head).module.path
        'model.lm_head'
    """

    copy: torch.nn.Module
    """The copy: a plain torch module of the module's class, whose parameters train.

    Examples:
        >>> head = ModuleCopy(model.lm_head)
        >>> type(head.copy).__name__, head.copy.weight is model.lm_head.weight
        ('Linear', False)
    """

    # The merge record belongs to this object alone, as `LORA`'s does.
    _not_copied = ("_merge_record",)

    def __init__(self, module: Envoy) -> None:
        """A copy of ``module``'s torch module; see the class."""
        check_envoy(module, type(self).__name__)
        _check_single_input(module)
        if any(t.is_meta for t in module._module.state_dict().values()):
            raise RuntimeError(
                f"`ModuleCopy` copies the weights of `{module.path}`, but the model's weights are "
                f"not loaded yet (they are on the meta device). Load the model with `dispatch=True`, "
                f"or run one trace first."
            )
        self._build(module, _plain_copy(module._module))

    def _build(self, module: Envoy, copy: torch.nn.Module) -> None:
        self._bind(module)
        self.copy = copy
        for parameter in self.copy.parameters():
            parameter.requires_grad_(True)
        self._merge_record = None

    @classmethod
    def _from_state(cls, module: Envoy, state: dict[str, torch.Tensor]) -> ModuleCopy:
        """A copy of ``module`` holding ``state`` (its whole ``state_dict``, checked to fit), built
        even while the model is still on the meta device: the saved tensors become the copy's."""
        copy = _plain_copy(module._module)
        own = copy.state_dict()
        # Each tensor in the module's own dtype, as PEFT's copy keeps it.
        copy.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, assign=True)
        clone = cls.__new__(cls)
        clone._build(module, copy)
        return clone

    @classmethod
    def _build_for_load(cls, module: Envoy, config: dict[str, Any]) -> ModuleCopy:
        """A copy to load saved tensors into, built even while the model is still on the meta device."""
        if config:
            raise TypeError(f"`ModuleCopy` takes no options besides the module, got {sorted(config)}.")
        _check_single_input(module)
        clone = cls.__new__(cls)
        clone._build(module, _plain_copy(module._module))
        return clone

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """The copy's tensors (keys ``copy.<name>``), checked first; on weights not loaded yet (meta), the saved tensors become the copy's.

        Examples:
            >>> head = ModuleCopy(model.lm_head)
            >>> _ = head.load_state_dict(ModuleCopy(model.lm_head).state_dict())
        """
        self._check_state_dict(state_dict, strict)
        on_meta = any(t.is_meta for t in self.copy.state_dict().values())
        return torch.nn.Module.load_state_dict(self, state_dict, strict, assign or on_meta)

    def forward(self, alpha: float = 1.0, *, steps: Steps = None, positions: Positions = None) -> None:
        """``head(alpha=1.0)``: replace the module's output with the copy's on this invoke's rows.

        Args:
            alpha: 1 replaces the output, 0 keeps the module's own, and values
                between blend them: ``out + alpha * (copy(x) - out)``.
            steps: Restrict it to some forward passes (see `LORA.forward`).
            positions: Restrict it to some tokens of each row (see `LORA.forward`).

        Raises:
            RuntimeError: Outside a trace, or while merged (`merge`).

        Examples:
            >>> head = ModuleCopy(model.lm_head)
            >>> with model.generate("Hello", max_new_tokens=3) as tracer:
            ...     head()
            ...     ids = tracer.result.save()
        """
        self._activate(alpha, steps, positions, self.call_name)

    def _positions(self, positions: Positions) -> PositionSpec | None:
        """`Optimization._positions`, refusing while merged (`merge`)."""
        if self.merged:
            raise RuntimeError(
                f"The copy of `{self.path}` is merged into the module's weights, so the model "
                f"already computes it for every row of every run. Drop the call, or call "
                f"`unmerge()` first to apply it per invoke again."
            )
        return normalize_positions(positions)

    def intervene(self, output: torch.Tensor, x: Any, alpha: float = 1.0) -> torch.Tensor:
        """The copy's output from the module's first input ``x``, blended with ``output`` by ``alpha``.

        Examples:
            >>> head = ModuleCopy(model.lm_head)
            >>> x = torch.randn(1, 3, 32)
            >>> out = model.lm_head._module(x)
            >>> torch.equal(head.intervene(out, x), out)   # an untrained copy computes the same
            True
        """
        new = self.copy(x)
        if not isinstance(new, torch.Tensor):
            new = first_tensor(new)
        if new is None or new.shape != output.shape:
            raise ValueError(
                f"The copy of `{self.path}` returned {tuple(new.shape) if new is not None else 'no tensor'} "
                f"from the module's first input, but the module's output has shape "
                f"{tuple(output.shape)}. The module computes its output from more than its first input."
            )
        new = new.to(output.dtype)
        return new if alpha == 1.0 else output + alpha * (new - output)

    # -- merging: the copy's tensors replace the module's -----------------------

    @property
    def merged(self) -> bool:
        """Whether the copy's tensors are written into the module (`merge`).

        Examples:
            >>> ModuleCopy(model.lm_head).merged
            False
        """
        return self._merge_record is not None

    def merge(self, alpha: float = 1.0) -> None:
        """Write the copy's parameters and buffers into the module: every run then computes the copy.

        Keeps the module's own tensors on the CPU so `unmerge` restores them bit
        for bit. Only ``alpha=1`` merges: a blend of outputs is not a blend of
        weights for a module that is not linear in them. Refused (nothing
        changed) for a module whose weight is tied to another module's.

        Examples:
            >>> head = ModuleCopy(model.transformer.ln_f)
            >>> head.merge()
            >>> head.unmerge()
        """
        alpha = check_alpha(alpha, "merge()", "the blend of the copy's output")
        if alpha != 1.0:
            raise ValueError(
                f"A `ModuleCopy` merges with alpha=1 only (got {alpha}): its weights replace the "
                f"module's, and a blend of the outputs is not a blend of the weights. Call it "
                f"inside traces with `alpha=` instead."
            )
        if self.merged:
            raise RuntimeError(f"The copy of `{self.path}` is already merged. Call `unmerge()` first.")
        target = self.module._module.state_dict(keep_vars=True)
        source = self.copy.state_dict()
        inside, prefix = {id(t) for t in target.values()}, hf_name(self.module) + "."
        tied = [
            name
            for name, parameter in self.module.root._module.named_parameters(remove_duplicate=False)
            if id(parameter) in inside and not name.startswith(prefix)
        ]
        if tied:
            raise RuntimeError(
                f"Cannot merge the copy of `{self.path}`: its tensors are tied to other parameters "
                f"({', '.join(f'`{n}`' for n in tied)}), so merging would change those modules too. "
                f"Call it inside traces instead."
            )
        if any(t.is_meta for t in target.values()):
            raise RuntimeError(f"Cannot merge the copy of `{self.path}`: the model's weights are not loaded yet.")
        originals = {name: tensor.detach().to("cpu", copy=True) for name, tensor in target.items()}
        with torch.no_grad():
            for name, tensor in target.items():
                tensor.copy_(source[name].to(tensor.device, tensor.dtype))
        self._merge_record = (originals, {name: _fingerprint(t) for name, t in target.items()})

    def unmerge(self) -> None:
        """Put the module's own tensors back, bit for bit.

        If they changed since the merge, they are restored all the same, with a
        warning: the copy replaced them, so there is no other state to return to.

        Examples:
            >>> head = ModuleCopy(model.transformer.ln_f)
            >>> before = model.transformer.ln_f.weight.clone()
            >>> head.merge()
            >>> head.unmerge()
            >>> torch.equal(model.transformer.ln_f.weight, before)
            True
        """
        if self._merge_record is None:
            raise RuntimeError(f"The copy of `{self.path}` is not merged; there is nothing to unmerge.")
        originals, fingerprints = self._merge_record
        target = self.module._module.state_dict(keep_vars=True)
        changed = [name for name, tensor in target.items() if _fingerprint(tensor) != fingerprints.get(name)]
        with torch.no_grad():
            for name, tensor in target.items():
                tensor.copy_(originals[name].to(tensor.device))
        if changed:
            warnings.warn(
                f"The tensors of `{self.path}` ({', '.join(changed)}) changed after the copy was "
                f"merged into them; the module's original tensors were restored anyway.",
                stacklevel=2,
            )
        self._merge_record = None

    def extra_repr(self) -> str:
        return f"{self.path}, copy={type(self.copy).__name__}"


def _check_single_input(module: Envoy) -> None:
    """Refuse a module whose forward needs more than its first input: the copy sees only that."""
    forward = type(module._module).forward
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return
    # One argument, and at most a catch-all `**kwargs` (classification heads take one and
    # ignore it). Optional arguments (masks, positions, caches) would go missing in the copy.
    others = [p.name for p in parameters[1:] if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if not parameters or parameters[0].kind is inspect.Parameter.VAR_KEYWORD or others:
        raise TypeError(
            f"`ModuleCopy` replaces a module's output with its copy's, computed from the module's "
            f"first input only, but `{module.path}` ({type(module._module).__name__}) also takes "
            f"{', '.join(f'`{n}`' for n in others) or 'no named input'}, which the copy would not "
            f"get. Put it on a module whose forward takes one input (a Linear, an Embedding, a "
            f"norm, a classification head)."
        )


def _plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` without nnsight's per-module controller and state.

    nnsight installs its `Controller` in each wrapped module's ``__dict__``
    (``install_controller``); the copy must run as plain torch, outside any trace.
    """
    from nnsight.intervention.source import STATE

    memo: dict[int, Any] = {}
    skipped = ("forward", STATE)
    for sub in module.modules():
        for key in skipped:
            if key in sub.__dict__:
                memo[id(sub.__dict__[key])] = None
    clone = copy_module.deepcopy(module, memo)
    for sub in clone.modules():
        for key in skipped:
            if key in sub.__dict__ and sub.__dict__[key] is None:
                del sub.__dict__[key]
    return clone


def _fingerprint(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().contiguous().to("cpu").reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).digest()
