"""`Optimization`: the base class of every trainable intervention in this package.

A trainable intervention is a small `torch.nn.Module` whose parameters you hand
to a torch optimizer, and which you *call inside a trace* to apply it to the
model there. Being a module is what gives it `state_dict()`,
`load_state_dict()`, `.to(...)`, `train()` and `eval()` for free.
"""

from __future__ import annotations

import abc
import copy
from typing import Any

import torch

from ..remote import _pickled_for_nnsight_server, check_shippable
from .grouped import MEMO as _GROUPED_MEMO
from .grouped import changed as _changed
from .positions import PositionSpec, normalize_positions


class Optimization(torch.nn.Module, metaclass=abc.ABCMeta):
    """Base class for trainable interventions: optimise its parameters, call it inside a trace.

    Subclasses implement `forward`, which runs inside ``model.trace(...)``,
    ``model.generate(...)`` or ``tracer.invoke(...)`` and applies the
    intervention there. Everything else is an ordinary `torch.nn.Module`.

    Methods of this class avoid zero-argument ``super()``: a class shipped by
    value to a remote nnsight server is rebuilt from source there, and the
    rebuilt methods have no ``__class__`` cell for ``super()`` to read.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> lora = LORA(model.transformer.h[0].mlp, r=8)      # an Optimization
        >>> optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-3)
        >>> with model.trace("The Eiffel Tower is in"):
        ...     lora()                                        # applies it in this trace
        ...     logits = model.lm_head.output.save()

        An intervention that acts in its own ``forward`` with nnsight's
        ``.output =`` (to write a kind that rows, ``positions=``, generation and
        save/load work for, subclass `ModuleIntervention` instead):

        >>> class Steer(Optimization):
        ...     def __init__(self, module, width):
        ...         Optimization.__init__(self)       # not super(): see above
        ...         self.module = module
        ...         self.vector = torch.nn.Parameter(torch.zeros(width))
        ...     def forward(self):
        ...         self.module.output = self.module.output + self.vector
        >>> steer = Steer(model.transformer.h[0], width=32)
        >>> with model.trace("The Eiffel Tower is in"):
        ...     steer()
        ...     logits = model.lm_head.output.save()
        >>> logits.sum().backward()
        >>> steer.vector.grad.shape
        torch.Size([32])
    """

    @abc.abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Apply the intervention to the running trace; you call the instance, not this method.

        Examples:
            >>> with model.trace("Hello"):
            ...     lora()              # runs LORA.forward inside this trace
        """

    reads_input = True
    """Whether `intervene` reads the module's first input ``x``.

    LoRA does; a steering vector does not, and then works on modules whose first
    input is not a tensor.

    Examples:
        >>> lora.reads_input
        True
    """

    reads_output = False
    """Whether `intervene`'s backward keeps the ``output`` it was given (`LoReFT`'s ``R h`` does).

    The machinery then hands it a copy of the invoke's rows that it will not
    overwrite. A class default, so the per-call check is a plain attribute read.

    Examples:
        >>> lora.reads_output
        False
    """

    reads_positions = False
    """Whether `intervene` takes each token's position as well (`SoftPrompt`: which vector goes where).

    Examples:
        >>> lora.reads_positions
        False
    """

    def intervene(self, output: torch.Tensor, x: Any, alpha: float) -> torch.Tensor:
        """The module's new output, from its ``output`` and first input ``x``: the formula alone.

        An intervention that switches itself on with
        `nnsight_toolbox.optim.activation.activate` in its `forward` implements
        this; the shared machinery calls it on every forward pass it acts on, with
        ``output`` and ``x`` already narrowed to the invoke's rows, and keeps the
        result only at the chosen ``positions=``. So rows, passes (``steps=``),
        positions, generation steps and clean-up after a run come for free, and
        the subclass holds only its formula. It returns a tensor of ``output``'s
        shape and dtype.

        Examples:
            >>> out, x = torch.zeros(1, 3, 32), torch.randn(1, 3, 32)
            >>> torch.allclose(lora.intervene(out, x, 1.0), lora.delta(x))   # LORA: output + alpha * delta(x)
            True
        """
        raise TypeError(
            f"`{type(self).__name__}` does not implement `intervene(output, x, alpha)`, so the "
            f"activation machinery cannot apply it. Implement it, or apply the intervention in "
            f"`forward` with nnsight's own `module.output = ...`."
        )

    def _positions(self, positions: Any) -> PositionSpec | None:
        """The `PositionSpec` this intervention acts on for ``positions=``, or a clear refusal.

        Where each class puts its own default (`SoftPrompt`: its ``n`` first
        positions) and refuses a switch-on it cannot take (a merged `LORA`), so a
        lone call and a set's call (`InterventionSet`) go through the same checks.
        """
        return normalize_positions(positions)

    def _follow_module_device(self) -> None:
        """Move the parameters (in place, keeping them the same objects) to the module's
        device, once the model has real weights there (it may start on the meta device).

        Called at every switch-on: the device found is kept on the intervention until
        an attribute is set or it is moved (`_note_change`), so that K sets switched
        on in one run do not each read their parameters, which the run has pushed
        out of the CPU's caches.
        """
        device = _module_device(self.module)
        if device is None or device.type == "meta":
            return
        state = self.__dict__
        if state.get(_DEVICE_MEMO) == device:  # where the parameters were, and nothing moved or replaced them since
            return
        first = first_parameter(self)
        if first is not None and device != first.device:
            self.to(device)
        state[_DEVICE_MEMO] = device

    def parameters(self, recurse: bool = True) -> list[torch.nn.Parameter]:  # type: ignore[override]
        """The trainable tensors, as a list ready for a torch optimizer.

        Examples:
            >>> optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-3)
            >>> [tuple(p.shape) for p in lora.parameters()]     # WA, WB
            [(32, 8), (8, 32)]
        """
        return list(torch.nn.Module.parameters(self, recurse))

    def __setattr__(self, name: str, value: Any) -> None:
        """Set an attribute as a module does, dropping what `grouped.key_of` kept from the old value.

        Examples:
            >>> lora.dropout = 0.0    # the next switch-on works out the adapter's group anew
        """
        _note_change(self)
        torch.nn.Module.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        _note_change(self)
        torch.nn.Module.__delattr__(self, name)

    def register_parameter(self, name: str, param: Any) -> None:
        """Register a parameter as a module does, dropping what the next switch-on would take from the old one.

        Examples:
            >>> lora.register_parameter("WB", torch.nn.Parameter(torch.zeros_like(lora.WB)))
        """
        _note_change(self)
        torch.nn.Module.register_parameter(self, name, param)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # `.to()`, `.half()`, `.cuda()`: the parameters may change dtype or device and stay the same objects
        _note_change(self)
        return torch.nn.Module._apply(self, fn, recurse)

    #: Attributes that belong to this object alone: a copy (``copy.copy``,
    #: ``copy.deepcopy``, a remote request's) starts with ``None`` there. `LORA`
    #: names its merge record, so exactly one object can take a merge back out.
    _not_copied: tuple[str, ...] = ()

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickle for a remote request (nnsight's serializer); refuse plain pickling.

        An intervention holds the nnsight Envoy of its module, and through it
        the whole model, its interleaver and weak references, so ``pickle`` and
        ``torch.save`` cannot write it. nnsight's remote serializer can: it sends
        the Envoy as a reference to the server's copy of the model. There, the
        class must first be shippable (`nnsight_toolbox.remote.check_shippable`):
        a clear error here beats a bare ``ModuleNotFoundError`` from the server.

        Examples:
            >>> import pickle
            >>> pickle.dumps(lora)
            Traceback (most recent call last):
            ...
            TypeError: A `LORA` cannot be pickled: ...
            >>> torch.save(lora.state_dict(), "weights.pt")   # the tensors pickle; or `lora.save(directory)`
        """
        if _holds_envoy(self) and not _pickled_for_nnsight_server():
            kind = type(self).__name__
            raise TypeError(
                f"A `{kind}` cannot be pickled: it holds the nnsight Envoy of the "
                f"module it acts on, and through it the whole model, which `pickle` and "
                f"`torch.save` cannot write. Save it instead: `.save(directory)`, then "
                f"`{kind}.load(directory, {'model' if hasattr(self, '_members') else 'module'})`, or "
                f"pickle its tensors, `state_dict()`, and load them into a new one with "
                f"`load_state_dict`. `copy.deepcopy` copies it in memory, and remote traces "
                f"(`remote=True`) send it as usual."
            )
        check_shippable(self)
        reduced = object.__reduce_ex__(self, protocol)
        if not isinstance(reduced[2], dict):
            return reduced
        # `_MEMOS` are run-time bookkeeping, worked out again where it runs; `_not_copied` starts as None
        state = {name: None if name in self._not_copied else value for name, value in reduced[2].items() if name not in _MEMOS}
        return (*reduced[:2], state, *reduced[3:])

    def __copy__(self) -> "Optimization":
        """A shallow copy: the same parameters and model, without the attributes in `_not_copied`.

        Examples:
            >>> import copy
            >>> copy.copy(lora).WA is lora.WA
            True
        """
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        for name in self._not_copied:
            if name in clone.__dict__:
                clone.__dict__[name] = None
        return clone

    def __deepcopy__(self, memo: dict) -> Optimization:
        """Copy the parameters but keep pointing at the same model.

        An intervention holds the nnsight Envoy it acts on; a deep copy of that
        would copy the whole model. ``copy.deepcopy(lora)`` is a snapshot of the
        adapter, so the model is shared instead. Attributes named in
        `_not_copied` start as ``None`` in the copy: a snapshot of a merged
        `LORA` is not merged, and only the original can `LORA.unmerge`.

        Examples:
            >>> import copy
            >>> snapshot = copy.deepcopy(lora)
            >>> snapshot.module is lora.module, snapshot.WA is lora.WA
            (True, False)
        """
        for value in self.__dict__.values():
            if _is_envoy(value):
                memo[id(value)] = value
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            if name not in _MEMOS:  # run-time bookkeeping: the copy works out its own
                clone.__dict__[name] = None if name in self._not_copied else copy.deepcopy(value, memo)
        return clone


#: Where `Optimization._follow_module_device` keeps the device it found, in the intervention's ``__dict__``.
_DEVICE_MEMO = "_device_memo"

#: What an intervention keeps of itself for the next switch-on, dropped by any change to it.
_MEMOS = (_GROUPED_MEMO, _DEVICE_MEMO)


def _note_change(obj: "Optimization") -> None:
    """An attribute of ``obj`` is set or deleted, a parameter registered, or it is moved: drop its memos."""
    obj.__dict__.pop(_DEVICE_MEMO, None)
    _changed(obj)


def _holds_envoy(obj: "Optimization") -> bool:
    return any(_is_envoy(value) for value in obj.__dict__.values())


def _is_envoy(value: Any) -> bool:
    from nnsight.intervention.envoy import Envoy

    return isinstance(value, Envoy)


def _module_device(module: Any) -> torch.device | None:
    """The device of an Envoy's module's parameters, or of the model's for a module with none."""
    # A layer's own weight first: this runs on every call of an intervention, and walking
    # `parameters()` of a whole block costs more than the rest of the call.
    first = first_parameter(module._module)
    return first.device if first is not None else module.root.device


def first_parameter(module: torch.nn.Module) -> torch.nn.Parameter | None:
    """The first of ``module.parameters()``, found without building its generators.

    A switch-on reads it for every intervention in every run: ``parameters()``
    walks every submodule through three generators and a set, which costs more
    than the rest of the switch-on. The order is the same: the module's own
    parameters, then each child's, depth first.

    Examples:
        >>> block = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 3))
        >>> first_parameter(block) is next(block.parameters())
        True
    """
    for parameter in module._parameters.values():
        if parameter is not None:
            return parameter
    for child in module._modules.values():
        found = first_parameter(child) if child is not None else None
        if found is not None:
            return found
    return None
