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

`InterventionSet` is the one collection: `LoraSet` is a layer on top of it for
adapters (keys by module path, `LORA.on`, merging), and shares its checks,
its call, its `state_dict` and its file format.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .activation import Steps, activate_many, current_mediator, normalize_steps, row_alphas
from .optimization import Optimization
from .positions import Positions

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["InterventionSet"]

Set = TypeVar("Set", bound="InterventionSet")


class InterventionSet(Optimization):
    """Any interventions on one model (`LORA`, `DoRA`, `ModuleCopy`, `SteeringVector`, `SoftPrompt`, `LoReFT`, `DiReFT`, your own kinds), as one.

    A set passed in (a `LoraSet` too) contributes its members. ``parameters()``
    holds every member's; `save` writes one directory; `load_state_dict` checks
    every member's keys and shapes before it changes any.

    Args:
        interventions: The members, in the order the set switches them on.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import InterventionSet, LoReFT, SteeringVector
        >>> mix = InterventionSet([LORA(model.transformer.h[0].mlp.c_fc, r=4), LoReFT(model.transformer.h[1], r=2)])
        >>> optimizer = torch.optim.AdamW(mix.parameters(), lr=1e-2)
        >>> with model.trace("The Eiffel Tower is in"):
        ...     mix()
        ...     logits = model.lm_head.output.save()
        >>> len(mix)
        2
    """

    call_name = "interventions()"

    interventions: torch.nn.ModuleList
    """The members, in the order the set switches them on.

    Examples:
        >>> from nnsight_toolbox import InterventionSet, SteeringVector
        >>> [type(m).__name__ for m in InterventionSet([SteeringVector(model.transformer.h[0])]).interventions]
        ['SteeringVector']
    """

    def __init__(self, interventions: Iterable[Optimization]) -> None:
        """Check the members (one model, no member twice) and hold them in order."""
        members = _members_of(interventions, type(self).__name__)
        Optimization.__init__(self)
        self._members = members
        self._root_path = members[0].module.path.split(".", 1)[0]
        self._register(members)

    def _register(self, members: list) -> None:
        """Make the members child modules, so ``parameters()``, ``.to()`` and ``train()`` reach them."""
        self.interventions = torch.nn.ModuleList(members)

    def _prefix(self, index: int, member: Any) -> str:
        """What a member's `state_dict` keys carry in the set's: its index (`LoraSet`: its module path)."""
        return f"{index}."

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
        what = self.call_name
        current_mediator(what)
        alpha = row_alphas(alpha, [type(member) for member in self._members], what, "the strength of the intervention")
        steps = normalize_steps(steps)
        switches = []  # switched on together, sharing the lookups of the invoke and its run
        for member in self._members:
            if type(member).intervene is Optimization.intervene:  # a custom one that acts in its own forward
                if switches:  # the members before it first: the order of calls is the order they apply in
                    activate_many(switches, alpha, steps, what)
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
            activate_many(switches, alpha, steps, what)

    def __iter__(self) -> Iterator[Optimization]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, index: int) -> Optimization:
        return self._members[index]

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:  # type: ignore[override]
        """Each member's `state_dict()` under its key in the set (``"<index>."``; a `LoraSet`'s module path).

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> list(InterventionSet([SteeringVector(model.transformer.h[0])]).state_dict())
            ['0.v']
        """
        out = OrderedDict() if destination is None else destination
        for i, member in enumerate(self._members):
            member.state_dict(destination=out, prefix=prefix + self._prefix(i, member), keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Load what `state_dict` gave into every member, all or none.

        Every member's keys and shapes are checked before any tensor is copied,
        and should a member still refuse its part, the members loaded before it
        are put back: a refused load leaves every member as it was.

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> a = InterventionSet([SteeringVector(model.transformer.h[0])])
            >>> a.load_state_dict(a.state_dict())
        """
        name = type(self).__name__
        parts, claimed = [], set()
        for i, member in enumerate(self._members):
            prefix = self._prefix(i, member)
            part = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
            claimed.update(prefix + key for key in part)
            parts.append(part)
        extra = sorted(key for key in state_dict if key not in claimed)
        if strict and extra:
            raise KeyError(
                f"`{name}.load_state_dict`: keys for no member: {extra[:4]}. Keys are a member's key in the "
                f"set ({self._prefix(0, self._members[0])!r} for the first) plus its own, as `state_dict()` gives them."
            )
        for i, (member, part) in enumerate(zip(self._members, parts)):
            check = getattr(member, "_check_state_dict", None)
            if check is None:
                continue
            try:
                check(part, strict)
            except (KeyError, ValueError) as error:
                text = error.args[0] if error.args else str(error)
                raise type(error)(f"`{name}.load_state_dict`, member {i} (`{type(member).__name__}` on `{member.module.path}`): {text}") from None
        before = [{key: value.detach().clone() for key, value in member.state_dict().items()} for member in self._members]
        done = []
        try:
            for member, part in zip(self._members, parts):
                member.load_state_dict(part, strict)
                done.append(member)
        except BaseException:
            for member, state in zip(done, before):
                member.load_state_dict(state)
            raise

    def save(self, directory: str | os.PathLike) -> None:
        """Save every member to ``directory``, in order, as one artifact (see `nnsight_toolbox.artifacts.native`).

        One tensor file and one JSON sidecar; module paths are written relative to
        the model, so the set loads onto any nnsight wrapper of the same
        architecture. The directory is replaced as a whole.

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> InterventionSet([SteeringVector(model.transformer.h[0])]).save("mix")
            >>> import os
            >>> sorted(os.listdir("mix"))
            ['interventions.json', 'interventions.safetensors']
        """
        from ..artifacts.native import save_interventions  # here, not at the top: see `ModuleIntervention.save`

        save_interventions(self._members, directory, self._root_path, f"`{type(self).__name__}.save`")

    @classmethod
    def load(cls: type[Set], directory: str | os.PathLike, model: Envoy) -> Set:
        """A new set on ``model`` with what ``directory`` holds, every file checked before anything is built.

        Each member goes on the module at its saved path, which ``model`` (the
        model itself, not a submodule) must have, with the saved widths.
        Directories of earlier versions (``lora_set.json``, ``interventions.json``)
        load too, and so does one intervention's save, as a set of one.

        Examples:
            >>> from nnsight_toolbox import InterventionSet, SteeringVector
            >>> InterventionSet([SteeringVector(model.transformer.h[0])]).save("mix")
            >>> len(InterventionSet.load("mix", model))
            1
        """
        from ..artifacts.native import load_many

        return cls(load_many(directory, model, f"`{cls.__name__}.load`"))

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}) {type(m).__name__}({m.module.path})" for i, m in enumerate(self._members))
        return f"{type(self).__name__}(\n{inner}\n)"


def _members_of(interventions: Any, who: str) -> list:
    """The members ``interventions`` gives (a set gives its own), checked: non-empty, on one model, none twice."""
    if isinstance(interventions, (Optimization, str)) or not isinstance(interventions, Iterable):
        raise TypeError(f"`{who}` takes an iterable of interventions, got {type(interventions).__name__}. Wrap one in a list.")
    members: list = []
    for item in interventions.values() if isinstance(interventions, Mapping) else interventions:
        members.extend(item._members if isinstance(item, InterventionSet) else [item])
    if not members:
        raise ValueError(f"`{who}` needs at least one intervention, got none.")
    for item in members:
        if not isinstance(item, Optimization) or getattr(item, "module", None) is None:
            raise TypeError(
                f"`{who}` takes interventions on modules (a `ModuleIntervention`: `LORA`, `DoRA`, `ModuleCopy`, "
                f"`SteeringVector`, `SoftPrompt`, `LoReFT`, `DiReFT`, a kind of your own, or a set of them), got {type(item).__name__}."
            )
    if len({id(m) for m in members}) != len(members):
        raise ValueError(f"`{who}` got the same intervention twice; it would apply twice. Pass each once.")
    models = {id(m.module.interleaver) for m in members}
    if len(models) > 1:
        roots = sorted({m.module.path.split(".", 1)[0] for m in members})
        raise ValueError(f"`{who}` holds interventions of one model; these are on {len(models)} models (roots {roots}). Make one set per model.")
    return members
