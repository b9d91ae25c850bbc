"""`LoraSet`: many `LORA` adapters, built by one call and applied by one call.

Real LoRA work adapts many modules at once (``q_proj`` and ``v_proj`` of every
layer, say). ``LORA.on(model, ["q_proj", "v_proj"], r=16)`` builds one adapter
per matching module (PEFT's matching rule, see `nnsight_toolbox.optim.targets`)
and returns them as a `LoraSet`::

    adapters = LORA.on(model, ["q_proj", "v_proj"], r=16)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)   # all of them
    with model.trace(batch):
        adapters()                      # every adapter, on this invoke's rows
        logits = model.lm_head.output.save()
    adapters["model.model.layers.0.self_attn.q_proj"]                # one `LORA`

Calling an adapter only registers it on its module's controller (see
`nnsight_toolbox.optim.activation`); it asks nnsight for no value, so the
adapters may be switched on in any order and code may read module outputs
between the calls: nothing here can raise nnsight's ``OutOfOrderError``.

The adapters are registered as a tree of child modules that mirrors their
paths, so ``state_dict()`` keys are the module paths themselves::

    model.transformer.h.0.attn.c_attn.WA    (768, 16)
    model.transformer.h.0.attn.c_attn.WB    (16, 2304)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import torch

from .activation import Steps, check_alpha
from .dims import infer_many_dims
from .intervention_set import InterventionSet
from .kinds import kind_named
from .paths import envoy_at
from .positions import Positions
from .targets import Layers, Targets, match_targets

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

    from .lora import LORA

__all__ = ["LoraSet", "ParameterCount", "adapters_on"]


class ParameterCount(NamedTuple):
    """Trainable parameters against all parameters (model plus adapters).

    Examples:
        >>> adapters = LORA.on(model, ["c_attn"], r=4)   # a tiny 2-layer GPT-2
        >>> count = adapters.trainable_parameters()
        >>> count.trainable, count.total, round(count.percent, 4)
        (1024, 42912, 2.3863)
    """

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """``100 * trainable / total``."""
        return 100.0 * self.trainable / self.total if self.total else 0.0


class LoraSet(InterventionSet, Mapping):
    """Many `LORA` adapters of one model, trained and switched on together.

    An `InterventionSet` (one ``parameters()`` list for one optimizer, one call
    to apply them all, one `save`) and a read-only mapping from module path to `LORA`, in the
    order the model reaches the modules. A set may also hold `DoRA` adapters
    and `ModuleCopy` interventions (what `import_peft` builds for PEFT's DoRA
    and ``modules_to_save``), one per module like any adapter. Build one with `LORA.on` (by matching
    module names) or from adapters you already have.

    Keys are nnsight paths (``"model.transformer.h.0.attn.c_attn"``); indexing
    also takes the Hugging Face path without the root's name
    (``"transformer.h.0.attn.c_attn"``) or the module's Envoy.

    Args:
        adapters: The adapters (`LORA`, `DoRA`, `ModuleCopy`: kinds that merge
            into the weights), each on a different module of the same model,
            none inside another's module.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> adapters = LoraSet([LORA(model.transformer.h[0].mlp, r=4), LORA(model.transformer.h[1].mlp, r=4)])
        >>> with model.trace("Hello"):
        ...     adapters(alpha=0.5)
        ...     logits = model.lm_head.output.save()
        >>> list(adapters)
        ['model.transformer.h.0.mlp', 'model.transformer.h.1.mlp']
    """

    call_name = "adapters()"

    def __init__(self, adapters: Iterable[LORA]) -> None:
        adapters = _check_adapters(adapters)
        root = adapters[0].module.root
        order = {f"{root.path}.{path}" if path else root.path: i for i, path in enumerate(name for name, _ in root._module.named_modules())}
        adapters.sort(key=lambda lora: order.get(lora.path, len(order)))
        _check_not_nested([lora.path for lora in adapters])
        InterventionSet.__init__(self, adapters)

    def _register(self, members: list) -> None:
        """Register the adapters as a tree of child modules that mirrors their paths, and index them by path."""
        self._by_path = {lora.path: lora for lora in members}
        for lora in members:
            _register_at_path(self, lora.path, lora)

    def _prefix(self, index: int, member: Any) -> str:
        return f"{member.path}."

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
        """One `LORA` on every module of ``model`` that ``targets`` picks (PEFT's rule).

        Args:
            model: The nnsight model (or any Envoy in it, to search below it only).
            targets: A regex that must match the whole module path, or a list
                whose entries match a path equal to them or ending in ``"."`` plus
                the entry (PEFT's ``target_modules``).
            r: The rank of every adapter.
            layers: Only modules in these layer indices (PEFT's ``layers_to_transform``):
                the number after ``layers.``, ``layer.``, ``h.`` or ``blocks.``.
            dropout: Dropout on each adapter's input, in training mode.
            dtype: The adapters' dtype, float32 by default as in PEFT.

        Examples:
            >>> adapters = LoraSet.on(model, ["c_attn", "c_fc"], r=16, layers=[0])
            >>> list(adapters)
            ['model.transformer.h.0.attn.c_attn', 'model.transformer.h.0.mlp.c_fc']
        """
        return cls(adapters_on(kind_named("LORA"), model, targets, r=r, layers=layers, dropout=dropout, dtype=dtype))

    # -- applying ------------------------------------------------------------

    def forward(self, alpha: float = 1.0, *, steps: Steps = None, positions: Positions = None) -> None:
        """Switch every adapter on for the running invoke, as ``lora(alpha, steps=steps, positions=positions)`` does.

        Args:
            alpha: Scale of every adapter's low-rank term.
            steps: Restrict them to some forward passes of the run (see `LORA.forward`).
            positions: Restrict them to some tokens of each row (see `LORA.forward`).

        Examples:
            >>> with model.generate("Hello", max_new_tokens=5) as tracer:
            ...     adapters()
            ...     ids = tracer.result.save()
        """
        merged = [path for path, lora in self._by_path.items() if lora.merged]
        if merged:
            raise RuntimeError(
                f"{len(merged)} adapter(s) of this set are merged into the weights (e.g. "
                f"`{merged[0]}`), so the model already computes them for every row of every "
                f"run; `adapters()` would add them a second time. Drop the call, or call "
                f"`adapters.unmerge()` first to apply them per invoke again."
            )
        InterventionSet.forward(self, alpha, steps=steps, positions=positions)

    # -- the mapping ---------------------------------------------------------

    def __getitem__(self, key: Union[str, "Envoy"]) -> LORA:
        """The adapter on a module, by nnsight path, Hugging Face path or Envoy.

        Examples:
            >>> adapters["transformer.h.0.attn.c_attn"] is adapters["model.transformer.h.0.attn.c_attn"]
            True
        """
        path = key if isinstance(key, str) else getattr(key, "path", None)
        if isinstance(path, str):
            for candidate in (path, f"{self._root_path}.{path}"):
                if candidate in self._by_path:
                    return self._by_path[candidate]
        shown = ", ".join(list(self._by_path)[:4])
        raise KeyError(
            f"No adapter on {key!r} in this `LoraSet`. Keys are module paths such as "
            f"{shown}{', ...' if len(self._by_path) > 4 else ''} (the root's name may be left out)."
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_path)

    def __len__(self) -> int:
        return len(self._by_path)

    def values(self) -> Any:
        """The adapters, in the order the model reaches their modules.

        Examples:
            >>> [type(lora).__name__ for lora in adapters.values()]
            ['LORA', 'LORA']
        """
        return self._by_path.values()

    def items(self) -> Any:
        """``(module path, adapter)`` pairs, in the order the model reaches the modules.

        Examples:
            >>> [path for path, lora in adapters.items()]
            ['model.transformer.h.0.attn.c_attn', 'model.transformer.h.1.attn.c_attn']
        """
        return self._by_path.items()

    # A Mapping compares by contents and so would be unhashable; a module is
    # compared by identity (optimizers and `named_modules` put it in sets).
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__

    # -- artifacts: `InterventionSet.save` and `InterventionSet.load`, one format for every set --

    @property
    def merged(self) -> bool:
        """Whether any adapter of the set is merged into its layer's weight (`merge`).

        Examples:
            >>> adapters = LORA.on(model, ["c_attn"], r=4)
            >>> adapters.merged
            False
        """
        return any(lora.merged for lora in self._by_path.values())

    def merge(self, alpha: float = 1.0) -> None:
        """Fold every adapter into its layer's weight, all or none (see `LORA.merge`).

        If any adapter cannot merge (a block, a tied weight, a result with NaN or
        Inf), the ones this call already merged are taken back out bit for bit
        before the error is raised: the model computes exactly what it did before.

        Examples:
            >>> adapters = LORA.on(model, ["c_attn"], r=4)
            >>> adapters.merge()
            >>> with model.generate("Hello", max_new_tokens=3) as tracer:
            ...     ids = tracer.result.save()     # no `adapters()` call: the weights carry them
            >>> adapters.unmerge()
        """
        alpha = check_alpha(alpha, "adapters.merge()", "the scale of every adapter's term")
        already = [path for path, lora in self._by_path.items() if lora.merged]
        if already:
            raise RuntimeError(
                f"{len(already)} adapter(s) of this set are already merged (e.g. `{already[0]}`); "
                f"merging again would add their deltas twice. Call `adapters.unmerge()` first."
            )
        done: list[LORA] = []
        try:
            for lora in self._by_path.values():
                lora.merge(alpha)
                done.append(lora)
        except BaseException:
            for lora in reversed(done):
                lora.unmerge()
            raise

    def unmerge(self) -> None:
        """Take every merged adapter back out of its weight (see `LORA.unmerge`).

        Examples:
            >>> adapters = LORA.on(model, ["c_attn"], r=4)
            >>> adapters.merge()
            >>> adapters.unmerge()
            >>> adapters.merged
            False
        """
        merged = [lora for lora in self._by_path.values() if lora.merged]
        if not merged:
            raise RuntimeError("No adapter of this set is merged; there is nothing to unmerge.")
        for lora in reversed(merged):
            lora.unmerge()

    # -- reporting -----------------------------------------------------------

    def trainable_parameters(self) -> ParameterCount:
        """How many parameters the adapters train, against the model's plus the adapters'.

        Counts as PEFT's ``get_nb_trainable_parameters`` does for a model whose
        base weights are frozen: every adapter tensor that requires grad is
        trainable, and the total is the model's parameters plus the adapters'.

        Examples:
            >>> adapters.trainable_parameters().trainable == sum(p.numel() for p in adapters.parameters())
            True
        """
        own = self.parameters()
        trainable = sum(p.numel() for p in own if p.requires_grad)
        model = next(iter(self._by_path.values())).module.root._module
        return ParameterCount(trainable, sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in own))

    def print_trainable_parameters(self) -> None:
        """Print trainable against all parameters on one line, as PEFT's method of this name does.

        Examples:
            >>> adapters = LORA.on(model, ["c_attn"], r=4)   # a tiny 2-layer GPT-2
            >>> adapters.print_trainable_parameters()
            trainable params: 1,024 || all params: 42,912 || trainable%: 2.3863
        """
        count = self.trainable_parameters()
        print(f"trainable params: {count.trainable:,d} || all params: {count.total:,d} || trainable%: {count.percent:.4f}")

    def __repr__(self) -> str:
        lines = [f"  ({path}): {type(lora).__name__}({lora.extra_repr().split(', ', 1)[1]})" for path, lora in self._by_path.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"


# ---------------------------------------------------------------------------
# Checks and registration
# ---------------------------------------------------------------------------


def adapters_on(
    kind: type[LORA], model: Envoy, targets: Targets, *, r: int, layers: Layers, dropout: float, dtype: torch.dtype
) -> list[LORA]:
    """One ``kind`` (`LORA` or a subclass such as `DoRA`) on every module ``targets`` picks, widths measured at once."""
    paths = match_targets(model, targets, layers)
    envoys = [envoy_at(model, path) for path in paths]
    dims = infer_many_dims(envoys, kind.__name__)  # widths: from weights, or one scan for all
    return [
        kind(envoy, r, dropout=dropout, dtype=dtype, input_dim=dims[envoy.path].input_dim, output_dim=dims[envoy.path].output_dim)
        for envoy in envoys
    ]


def _check_adapters(adapters: Any) -> list[LORA]:
    """The adapters as a list: kinds that merge into the weights (`LORA`, `DoRA`, `ModuleCopy`), one per module."""
    if isinstance(adapters, str) or not isinstance(adapters, Iterable) or (getattr(adapters, "module", None) is not None and not isinstance(adapters, Mapping)):
        raise TypeError(
            f"`LoraSet` takes an iterable of `LORA` adapters, got {type(adapters).__name__}. "
            f"To build adapters by module name, use `LORA.on(model, ['q_proj', 'v_proj'], r=8)`."
        )
    adapters = list(adapters.values() if isinstance(adapters, Mapping) else adapters)
    wrong = [type(a).__name__ for a in adapters if getattr(a, "module", None) is None or not callable(getattr(type(a), "merge", None))]
    if not adapters or wrong:
        raise TypeError(
            f"`LoraSet` takes a non-empty iterable of adapters that merge into the weights (`LORA`, "
            f"`DoRA`, `ModuleCopy`), got {'nothing' if not adapters else 'a ' + wrong[0]}. "
            f"For other kinds, or a mix, use `InterventionSet`."
        )
    roots = {id(lora.module.root) for lora in adapters}
    if len(roots) > 1:
        raise ValueError(
            "The adapters of one `LoraSet` must all be on modules of the same model; "
            "these come from different models. Make one set per model."
        )
    paths = [lora.path for lora in adapters]
    twice = sorted({path for path in paths if paths.count(path) > 1})
    if twice:
        raise ValueError(
            f"Two adapters of one `LoraSet` are on the same module ({twice[0]}); a set "
            f"holds one adapter per module. Put the other in a second set."
        )
    return adapters


def _check_not_nested(paths: list[str]) -> None:
    """Refuse an adapter on a module inside another adapter's module.

    The set's child modules mirror the paths (for readable ``state_dict`` keys),
    so ``...mlp`` and ``...mlp.c_fc`` cannot both hold an adapter.
    """
    for outer in paths:
        inner = next((p for p in paths if p.startswith(outer + ".")), None)
        if inner is not None:
            raise ValueError(
                f"`{inner}` lies inside `{outer}`, and both would get an adapter. A "
                f"`LoraSet` holds adapters on modules none of which contains another: "
                f"narrow `targets` (a regex must match the whole path, e.g. r'.*\\.c_fc') "
                f"or build two sets."
            )


def _register_at_path(root: torch.nn.Module, path: str, lora: LORA) -> None:
    """Register ``lora`` as ``root``'s descendant at the dotted ``path``, creating
    empty container modules on the way.

    Written into ``_modules`` directly: a path part may be a name ``add_module``
    refuses because the container already has an attribute of that name
    (``train``, ``forward``), and ``state_dict`` only ever reads ``_modules``.
    """
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        child = node._modules.get(part)
        if child is None:
            child = node._modules[part] = torch.nn.Module()
        node = child
    node._modules[leaf] = lora
