"""`InterventionSet`: any mix of interventions on one model, applied by one call.

LoRA on ``q_proj`` plus LoReFT on a layer's output, or several steering
vectors: each member switches itself on through the shared machinery
(`nnsight_toolbox.optim.activation`), which asks nnsight for no value, so the
members may be switched on in any order and nothing here can raise nnsight's
``OutOfOrderError``.

Two interventions on the same module apply in the order they were switched on:
the module's controller keeps activations in call order and applies each to
the output of the one before. Calling the set switches its members on in the
set's order, so ``InterventionSet([steer, reft])`` on one layer computes
``reft(steer(h))``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .activation import Steps, activate_many, check_alpha, normalize_steps
from .adapter_set import LoraSet
from .optimization import Optimization
from .positions import Positions

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["InterventionSet"]


class InterventionSet(Optimization):
    """Several interventions (`LORA`, `SteeringVector`, `SoftPrompt`, `LoReFT`, `DiReFT`) on one model, as one.

    A `LoraSet` passed in contributes its adapters. ``parameters()`` holds every
    member's; `save` writes one directory.

    Args:
        interventions: The members, in the order the set switches them on.

    Examples:
        >>> from nnsight_toolbox import InterventionSet, LoReFT, SteeringVector
        >>> mix = InterventionSet([LORA(model.transformer.h[0].mlp.c_fc, r=4), LoReFT(model.transformer.h[1], r=2)])
        >>> optimizer = torch.optim.AdamW(mix.parameters(), lr=1e-2)
        >>> with model.trace("The Eiffel Tower is in"):
        ...     mix()
        ...     logits = model.lm_head.output.save()
        >>> len(mix)
        2
    """

    interventions: torch.nn.ModuleList
    """The members, in the order the set switches them on.

    Examples:
        >>> from nnsight_toolbox import InterventionSet, SteeringVector
        >>> [type(m).__name__ for m in InterventionSet([SteeringVector(model.transformer.h[0])]).interventions]
        ['SteeringVector']
    """

    def __init__(self, interventions: Iterable[Optimization]) -> None:
        """Check the members (one model, no member twice) and hold them in order."""
        members: list[Optimization] = []
        for item in interventions:
            members.extend(item.values() if isinstance(item, LoraSet) else [item])
        if not members:
            raise ValueError("`InterventionSet` needs at least one intervention, got none.")
        for item in members:
            if not isinstance(item, Optimization) or isinstance(item, InterventionSet) or getattr(item, "module", None) is None:
                raise TypeError(
                    f"`InterventionSet` takes interventions on modules (`LORA`, `SteeringVector`, `SoftPrompt`, "
                    f"`LoReFT`, `DiReFT`, or a `LoraSet`), got {type(item).__name__}."
                )
        if len({id(m) for m in members}) != len(members):
            raise ValueError("`InterventionSet` got the same intervention twice; it would apply twice. Pass each once.")
        roots = {m.module.path.split(".", 1)[0] for m in members}
        models = {id(m.module.interleaver) for m in members}
        if len(models) > 1:
            raise ValueError(f"`InterventionSet` holds interventions of one model; these are on {len(models)} models (roots {sorted(roots)}).")
        Optimization.__init__(self)
        self.interventions = torch.nn.ModuleList(members)
        self._root_path = roots.pop()

    @property
    def root_path(self) -> str:
        """The nnsight path of the model's root (``"model"``); saved module paths are relative to it.

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> InterventionSet([SteeringVector(model.transformer.h[0])]).root_path
            'model'
        """
        return self._root_path

    def forward(self, alpha: float = 1.0, *, steps: Steps = None, positions: Positions = None) -> None:
        """Switch every member on for the running trace, in the set's order, with the same options.

        ``positions=None`` leaves each member at its own default (every token;
        0…n-1 for a `SoftPrompt`). To give members different options, call them
        one by one instead; the order of calls is the order they apply in.

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> mix = InterventionSet([SteeringVector(model.transformer.h[0]), SteeringVector(model.transformer.h[1])])
            >>> with model.generate("Hello", max_new_tokens=3) as tracer:
            ...     mix(alpha=2.0, positions=slice(-1, None))
            ...     ids = tracer.result.save()
        """
        alpha = check_alpha(alpha)
        steps = normalize_steps(steps)
        switches = []  # switched on together, sharing the lookups of the invoke and its run
        for member in self.interventions:
            if type(member).intervene is Optimization.intervene:  # a custom one that acts in its own forward
                if switches:  # the members before it first: the order of calls is the order they apply in
                    activate_many(switches, alpha, steps, "InterventionSet()")
                    switches = []
                if positions is None:
                    member(alpha, steps=steps)
                else:
                    member(alpha, steps=steps, positions=positions)
                continue
            chosen = member._positions(positions)  # the member's own checks and default, as its own call makes
            member._follow_module_device()
            switches.append((member, member.module, chosen))
        if switches:
            activate_many(switches, alpha, steps, "InterventionSet()")

    def __iter__(self) -> Iterator[Optimization]:
        return iter(self.interventions)

    def __len__(self) -> int:
        return len(self.interventions)

    def __getitem__(self, index: int) -> Optimization:
        return self.interventions[index]

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:  # type: ignore[override]
        """Each member's `state_dict()` under ``"<index>."``: pyreft's keys for a `LoReFT`, ``WA``/``WB`` for a `LORA`.

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> list(InterventionSet([SteeringVector(model.transformer.h[0])]).state_dict())
            ['0.v']
        """
        out = {} if destination is None else destination
        for i, member in enumerate(self.interventions):
            member.state_dict(destination=out, prefix=f"{prefix}{i}.", keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Load what `state_dict` gave, member by member (each member checks its own keys).

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> a = InterventionSet([SteeringVector(model.transformer.h[0])])
            >>> a.load_state_dict(a.state_dict())
        """
        for i, member in enumerate(self.interventions):
            part = {k[len(f"{i}."):]: v for k, v in state_dict.items() if k.startswith(f"{i}.")}
            member.load_state_dict(part)
        known = {f"{i}." for i in range(len(self.interventions))}
        extra = sorted(k for k in state_dict if not any(k.startswith(p) for p in known))
        if strict and extra:
            raise KeyError(f"`InterventionSet.load_state_dict`: keys for no member: {extra[:4]}.")

    def save(self, directory: str | os.PathLike) -> None:
        """Save every member to ``directory``, as one artifact (see `nnsight_toolbox.artifacts.native_intervention`).

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> InterventionSet([SteeringVector(model.transformer.h[0])]).save("mix")
            >>> import os
            >>> sorted(os.listdir("mix"))
            ['interventions.json', 'interventions.safetensors']
        """
        from ..artifacts.native_intervention import save_intervention_set

        save_intervention_set(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Envoy) -> InterventionSet:
        """A new set on ``model`` with what ``directory`` holds, every file checked first.

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> InterventionSet([SteeringVector(model.transformer.h[0])]).save("mix")
            >>> len(InterventionSet.load("mix", model))
            1
        """
        from ..artifacts.native_intervention import load_intervention_set

        return load_intervention_set(directory, model, cls)

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}) {type(m).__name__}({m.module.path})" for i, m in enumerate(self.interventions))
        return f"InterventionSet(\n{inner}\n)"
