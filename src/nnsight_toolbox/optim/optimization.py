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

from ..remote import check_shippable


class Optimization(torch.nn.Module, metaclass=abc.ABCMeta):
    """Base class for trainable interventions: optimise its parameters, call it inside a trace.

    Subclasses implement `forward`, which runs inside ``model.trace(...)``,
    ``model.generate(...)`` or ``tracer.invoke(...)`` and applies the
    intervention there. Everything else is an ordinary `torch.nn.Module`.

    Methods of this class avoid zero-argument ``super()``: a class shipped by
    value to a remote nnsight server is rebuilt from source there, and the
    rebuilt methods have no ``__class__`` cell for ``super()`` to read.

    Examples:
        >>> lora = LORA(model.transformer.h[0].mlp, r=8)      # an Optimization
        >>> optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-3)
        >>> with model.trace("The Eiffel Tower is in"):
        ...     lora()                                        # applies it in this trace
        ...     logits = model.lm_head.output.save()

        A trainable intervention of your own: a steering vector added to a
        module's output.

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

    def parameters(self, recurse: bool = True) -> list[torch.nn.Parameter]:  # type: ignore[override]
        """The trainable tensors, as a list ready for a torch optimizer.

        Examples:
            >>> optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-3)
            >>> [tuple(p.shape) for p in lora.parameters()]     # WA, WB
            [(32, 8), (8, 32)]
        """
        return list(torch.nn.Module.parameters(self, recurse))

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickle as any module; for a remote request, first check the server can rebuild the class.

        See `nnsight_toolbox.remote.check_shippable`: a clear error here beats a
        bare ``ModuleNotFoundError`` from the server.
        """
        check_shippable(self)
        return object.__reduce_ex__(self, protocol)

    def __deepcopy__(self, memo: dict) -> Optimization:
        """Copy the parameters but keep pointing at the same model.

        An intervention holds the nnsight Envoy it acts on; a deep copy of that
        would copy the whole model. ``copy.deepcopy(lora)`` is a snapshot of the
        adapter, so the model is shared instead.
        """
        for value in self.__dict__.values():
            if _is_envoy(value):
                memo[id(value)] = value
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            clone.__dict__[name] = copy.deepcopy(value, memo)
        return clone


def _is_envoy(value: Any) -> bool:
    from nnsight.intervention.envoy import Envoy

    return isinstance(value, Envoy)
