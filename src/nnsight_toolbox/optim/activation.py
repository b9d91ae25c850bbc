"""Activating an adapter for one run: its delta rides in the module's own forward.

nnsight 0.8 gives every wrapped module a `Controller` as its instance
``forward`` (``nnsight/intervention/source.py``). Calling an adapter inside a
trace swaps that controller, for this module only, for an `AdapterController`
that does the same four steps and adds the adapters' deltas to the body's
output *before* the output handoff::

    nnsight's Controller              AdapterController
    --------------------              -----------------
    handle(path.input)                handle(path.input)
    skip gate                         skip gate
    out = body(...)                   out = body(...) + sum of alpha * delta(x) over
                                                        the adapters active on these rows
    handle(path.output, out)          handle(path.output, out)

Why here rather than through ``envoy.output = ...``:

- it acts on every forward pass of the run (every generation step) without the
  user's worker parking on each step, so the code after ``lora()`` still runs;
- ``module.output`` read afterwards is the adapted value, because the delta is
  added before the output handoff;
- a generation step costs one Python call and the delta's matmuls, with no
  greenlet switch.

Scoping. An activation belongs to the `Mediator` (one invoke of one run) that
called the adapter. It is live only while that mediator's worker is the one nnsight
started for the running trace; `Interleaver.cancel` (in the driver's
``finally``) drops the worker, so after a run, or a run that raised, every
activation is dead and the module computes its base function. The first call
after that finds only dead activations and puts nnsight's own controller back.
Rows come from the mediator's ``batch_group``: an invoke's adapter touches only
its own rows of the combined batch.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Optional

import torch
from greenlet import getcurrent
from nnsight.intervention.source import NO_SKIP, Controller, _as_fragment, run_body
from nnsight.intervention.util import first_input

from . import grouped
from .acted import watch
from .dims import first_tensor
from .layout import BATCH_FIRST, TIME_FIRST
from .positions import PYTHON_MASK_TOKENS, PositionSpec, column_positions, normalize_positions, position_mask, python_columns, python_mask
from .rows import NOTE, layout_error, note_lengths, pass_lengths, prompt_shape, row_span
from .standby import STANDBY, Standby

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy
    from nnsight.intervention.interleaver import Interleaver, Mediator

#: What `steps=` accepts: one step, a slice or range of steps, or any iterable of them.
Steps = Optional[Any]

#: How often one invoke may switch the same adapter on while no forward pass runs.
#: A loop body that only calls the adapter (``for step in tracer.all(): lora()``)
#: never waits for the model, so it would spin forever; no real use comes near this.
MAX_CALLS_PER_PASS = 10_000


class Activation:
    """One adapter switched on by one invoke of one run.

    Holds the mediator and its worker weakly: both belong to nnsight's run, and
    an activation must never keep a finished run alive. Holds the adapter
    weakly too: the module's controller (and this activation on it) stays until
    the module next runs, and a user who deletes the adapter before that must
    get its memory, and its gradients', back. The run keeps the adapter alive
    while it lasts instead: its worker greenlet holds it, and nnsight drops the
    worker when the run ends (`Interleaver.cancel`).
    """

    __slots__ = ("_adapter", "alpha", "steps", "last_pass", "finished", "positions", "rows", "plain", "mediator", "worker", "root_input", "calls", "calls_pass", "source", "acted", "warned_own_call", "what", "group", "group_key", "tensors")

    def __init__(
        self, adapter: Any, alpha: float, steps: Any, mediator: "Mediator", root_input: str, positions: PositionSpec | None = None, rows: list | None = None
    ) -> None:
        self._adapter = weakref.ref(adapter)
        worker = mediator.worker
        kept = worker.__dict__.get("nnsight_toolbox_adapters")  # greenlets take attributes
        if kept is None:
            kept = worker.__dict__["nnsight_toolbox_adapters"] = []
        kept.append(adapter)
        # The invoke's rows [start, size] of the run's batch, None for all of it: fixed for the
        # run, since nnsight batches every invoke before the model runs.
        self.rows = rows
        self.source = None  # a swap's source (`SwapSource` or a tensor), set by `activate_swap`; None for every other kind
        self.group_key = self.tensors = None  # set by `update`
        self.update(alpha, steps, positions)
        self.mediator = weakref.ref(mediator)
        self.worker = weakref.ref(worker)
        self.root_input = root_input  # the root module's input location, to count passes
        self.calls, self.calls_pass = 1, None  # repeat calls within one pass (see `MAX_CALLS_PER_PASS`)
        self.acted = False  # acted on some token of some pass: a run that ends with it False raises (see `acted`)
        self.warned_own_call = False  # warned that the user's own call of the module was not adapted (`stood_down`)
        self.what = "the intervention"  # the call that switched it on (`lora()`), for messages
        self.group = None  # the collection call (`adapters()`) that switched it on with others, if any (see `acted`)

    def update(self, alpha: float, steps: Any, positions: PositionSpec | None) -> None:
        """Set the options of the call that switched it on (a repeat call from the same invoke sets them anew)."""
        self.alpha = alpha
        self.steps = steps  # None (every pass) or a container of pass indices
        self.last_pass = last_pass(steps)  # None: no last one
        self.finished = False  # every chosen pass is behind (see `acts_on_this_pass`)
        self.positions = positions  # None (every token) or the tokens of each row to act on
        # The whole batch, every token, no source to pair: nothing to narrow.
        # One alpha too: one per row (a tensor) is applied by `grouped`, which gives each row its own.
        self.plain = self.rows is None and positions is None and self.source is None and type(alpha) is float
        # Which group it may join on a module with others (see `grouped.plan`), worked out here, where the
        # adapter is at hand, not at the module's first pass; `None`: it goes one by one.
        self.group_key, self.tensors = grouped.key_of(self._adapter(), self.rows, alpha)

    @property
    def adapter(self) -> Any:
        """The adapter; alive while the run is (its worker holds it), ``None`` once it was deleted after."""
        return self._adapter()

    def live_mediator(self, interleaver: "Interleaver") -> "Mediator | None":
        """The mediator, if it is still running in ``interleaver``'s current run."""
        mediator = self.mediator()
        if mediator is None or mediator.interleaver is not interleaver:
            return None
        worker = mediator.worker
        if worker is None or worker is not self.worker():
            return None
        return mediator

    def acts_on_this_pass(self, mediator: "Mediator") -> bool:
        """Whether the pass now running is one of ``steps``; past the last of them, the activation is `finished`."""
        if self.steps is None:
            return True
        # The root's input handoff counts forward passes: it has fired once for
        # the pass now running, so the pass index is that count minus one. An
        # encoder that `generate` runs before the first pass belongs to pass 0.
        index = max(mediator.occurrence(self.root_input) - 1, 0)
        if index in self.steps:
            return True
        if index > self.last_pass:  # pass indices only grow: it will act on no later pass of this run
            self.finished = True
        return False


class AdapterController(Controller):
    """nnsight's module controller plus the deltas of the adapters active on it.

    Installed by `activate` in place of the module's nnsight `Controller` and
    removed again by the first call that finds every activation dead. Copying or
    pickling the module yields nnsight's plain controller (inherited
    ``__deepcopy__``/``__reduce__``), so no activation travels with a copy.
    """

    #: Marks adapter controllers of every copy of this class (see `set_aside_other_copies`).
    adapts_module_forward = True

    def __init__(self, inner: Controller) -> None:
        self.__dict__.update(inner.__dict__)  # state, module_ref, signature metadata
        self.inner = inner
        self.activations: list[Activation] = []
        # On the root (and an encoder-decoder's encoder) during a run with
        # row-scoped adapters: "root"/"encoder", the role whose sequence lengths
        # each forward notes (see `rows.note_lengths`), and that run's batcher.
        self.noting: str | None = None
        self.noting_for: Any = None
        self.encoder_decoder = False
        # `activations` by id of their adapter, rebuilt once per run (see `_switch_on`).
        self.by_adapter: dict = {}
        self.pruned_for: Any = None  # the run (its batcher, weakly) `activations` were last pruned for
        # `grouped.plan` of each set of live activations seen since the last switch-on (see `add_deltas`).
        self.plans: dict = {}
        # Outside autograd, the last group's stacked parameters, kept across runs (see `grouped.Group.stack`).
        self.stacks: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        interleaver, _, locations = state.active()
        if self.noting is not None and interleaver is not None:
            batcher = interleaver.batcher
            if batcher is not None and self.noting_for() is batcher:
                notes = note_lengths(batcher, self.noting, args, kwargs, self.encoder_decoder)
                standby = notes.get(STANDBY)
                if standby is not None:  # `positions=` in this run: modules whose tokens are all behind rest (see `standby`)
                    standby.review(notes, interleaver)
                if not self.activations:  # the root, noting for adapters elsewhere: nothing to retire
                    return self._handoff(interleaver, locations, args, kwargs)
        if interleaver is None and self.activations and self.stood_down():
            return self.inner(*args, **kwargs)  # your own call inside a running trace (a logit lens): see `stood_down`
        live = self.live(interleaver) if interleaver is not None else []
        if not live:
            self.retire_if_idle(interleaver)
            return self.inner(*args, **kwargs)
        handle = interleaver.handle
        args, kwargs = handle(locations[0], (args, kwargs))
        skipped = handle(locations[1], NO_SKIP)
        if skipped is not NO_SKIP:  # a skipped module has no body for a delta to ride on
            return handle(locations[2], _as_fragment(interleaver, locations[2], skipped))
        output = run_body(state, self.module_ref(), args, kwargs)
        x = first_input(args, kwargs)
        if len(live) == 1 and type(output) is torch.Tensor and type(x) is torch.Tensor:
            activation = live[0]
            if activation.plain:  # the usual case, with nothing to narrow: `add_deltas`' first branch
                activation.acted = True
                return handle(locations[2], activation._adapter().intervene(output, x, activation.alpha))
        return handle(locations[2], add_deltas(output, x, live, interleaver, self))

    def _handoff(self, interleaver: "Interleaver", locations: tuple, args: tuple, kwargs: dict) -> Any:
        """nnsight's own four steps (`Controller.__call__`) once `state.active()` is known: a root's note then costs one call, not two."""
        handle = interleaver.handle
        args, kwargs = handle(locations[0], (args, kwargs))
        skipped = handle(locations[1], NO_SKIP)
        if skipped is not NO_SKIP:
            return handle(locations[2], _as_fragment(interleaver, locations[2], skipped))
        return handle(locations[2], run_body(self.state, self.module_ref(), args, kwargs))

    @property
    def path(self) -> str:
        routes = self.state.routes
        return routes[0][1] if routes else type(self.module_ref()).__name__

    def live(self, interleaver: "Interleaver") -> list[Activation]:
        """The activations running in ``interleaver``'s current run and acting on this pass."""
        live = []
        for activation in self.activations:
            # `Activation.live_mediator` written out: this runs on every call of every adapted module.
            mediator = activation.mediator()
            if mediator is None or mediator.interleaver is not interleaver:
                continue
            worker = mediator.worker
            if worker is None or worker is not activation.worker():
                continue
            if activation.steps is None or activation.acts_on_this_pass(mediator):
                live.append(activation)
        return live

    def stood_down(self) -> bool:
        """Whether this call is the user's own call of the module inside a run that is still going.

        nnsight stands a trace down while code in an invoke calls a module
        itself (``model.lm_head(h)``, a logit lens): `Envoy.__call__` clears
        ``interleaving`` for the call, so nothing is handed off. Such a call
        computes the module's base function, whatever interventions are on it:
        they act on the model's own forward only (the one rule, on the gotchas
        page). The model's own call later in the pass must still be adapted, so
        the activations stay (they are not retired as a finished run's are),
        and each warns once that this call was not adapted.
        """
        running = []
        for activation in self.activations:
            mediator = activation.mediator()
            if mediator is not None and mediator.worker is not None and mediator.worker is activation.worker() and mediator.interleaver is not None:
                running.append(activation)
        if not running:
            return False
        for activation in running:
            if not activation.warned_own_call:
                activation.warned_own_call = True
                warnings.warn(
                    f"Your own code ran `{self.path}` inside the trace (by calling it, or a module "
                    f"that holds it, as a logit lens does) while an intervention is switched on "
                    f"there. That call computes "
                    f"the module's base function: interventions act on the model's own calls "
                    f"only, which stay adapted. To see the adaptation in your own call, "
                    f"`merge()` it first (LoRA, DoRA), or apply it yourself to the call's output.",
                    stacklevel=4,
                )
        return True

    def note_for(self, batcher: Any, role: str, encoder_decoder: bool) -> None:
        """Note the sequence lengths of each forward of this module in ``batcher``'s run."""
        self.noting, self.noting_for, self.encoder_decoder = role, weakref.ref(batcher), encoder_decoder

    def retire_if_idle(self, interleaver: "Interleaver | None") -> None:
        """Drop dead and finished activations; with none left, give the module back its own controller.

        A finished one (``steps=`` all behind) goes too, so a module whose
        intervention acted at the prefill only (``steps=0``) costs the rest of a
        generation what nnsight alone costs. A later switch-on in the same run
        installs a controller again (`_adapter_controller`).
        """
        self.activations = [
            a for a in self.activations if not a.finished and interleaver is not None and a.live_mediator(interleaver) is not None
        ]
        self.pruned_for = None  # `by_adapter` is rebuilt at the next switch-on
        self.plans = {}
        if self.noting is not None and (interleaver is None or self.noting_for() is not interleaver.batcher):
            self.noting = self.noting_for = None  # that run has ended
        if not self.activations and self.noting is None:
            module = self.module_ref()
            if module is not None and module.__dict__.get("forward") is self:
                module.__dict__["forward"] = self.inner


def set_aside_other_copies(controller: Any) -> Any:
    """``controller``, or nnsight's own controller under adapter controllers of other copies of this code.

    A remote request ships this package by value, so each request runs its own
    copy of `AdapterController`, and the one an earlier request left on the
    server's shared model is not an instance of this request's copy. Its runs
    have ended (a server runs one request at a time, and `Interleaver.cancel`
    ended them), so it is set aside here; wrapping it instead would nest one
    more controller on the module with every request.
    """
    while (
        not isinstance(controller, AdapterController)
        and getattr(type(controller), "adapts_module_forward", False)
        and isinstance(getattr(controller, "inner", None), Controller)
    ):
        controller = controller.inner
    return controller


def add_deltas(
    output: Any,
    x: Any,
    live: list[Activation],
    interleaver: "Interleaver",
    controller: AdapterController,
) -> Any:
    """``output`` with each live intervention applied on its rows (and positions).

    Each intervention's ``intervene(output, x, alpha)`` gives the new value of the
    module's output (its first element, for a tuple) from that output and the
    module's first input ``x``; `LORA`'s adds ``alpha * delta(x)``. This function
    decides *where*: every row, or the invoke's rows (see `rows`), and every
    token, or the chosen ``positions=`` (see `positions`). It runs on every
    forward pass of every adapted module, so the usual case (one intervention,
    the whole batch, every token) takes no copy, and the module's path is looked
    up only for an error message.
    """
    target = output if type(output) is torch.Tensor else first_tensor(output)
    if target is None:
        path = controller.path
        raise TypeError(
            f"`{path}` returned a {type(output).__name__} that holds no tensor, so "
            f"the intervention has nothing to act on. Put it on a module whose output is "
            f"a tensor (or a tuple whose first element is one)."
        )
    if not isinstance(x, torch.Tensor) and any(getattr(a.adapter, "reads_input", True) for a in live):
        path = controller.path
        raise TypeError(
            f"`{path}` was called with a {type(x).__name__} as its first input, not "
            f"a tensor, so the adapter has nothing to multiply."
        )
    batcher = interleaver.batcher
    adapted = target
    cloned = False
    spans = None  # (output, input) dim-0 entries per batch row; see `rows.row_span`
    # Several of one kind on their own rows (or one alpha per row): one computation (see `grouped`).
    steps = live if len(live) == 1 and type(live[0].alpha) is float else _planned(live, controller)
    for step in steps:
        if type(step) is grouped.Group:
            changed = grouped.apply(step, adapted, target, x, batcher, controller, (_chosen_tokens, _row_spans, check_batch_axis))
            if changed is not None:
                if changed is not adapted:
                    adapted, cloned = changed, False
                continue
        for activation in step.members if type(step) is grouped.Group else (step,):  # one by one: a single, or a group whose layout `grouped` does not take
            adapted, cloned, spans = _apply_one(activation, adapted, cloned, spans, target, x, batcher, controller)
    return adapted if output is target else replace_first_tensor(output, adapted)


def _planned(live: list[Activation], controller: AdapterController) -> list:
    """`grouped.plan` of ``live``, worked out once per run and set of live activations (`_switch_on` clears the plans)."""
    key = tuple(live)
    steps = controller.plans.get(key)
    if steps is None:
        steps = controller.plans[key] = grouped.plan(live)
    return steps


def _apply_one(
    activation: Activation, adapted: torch.Tensor, cloned: bool, spans: Any, target: torch.Tensor, x: Any, batcher: Any, controller: AdapterController
) -> tuple[torch.Tensor, bool, Any]:
    """`add_deltas` for one activation: ``(adapted, cloned, spans)`` after it."""
    adapter, alpha, spec = activation._adapter(), activation.alpha, activation.positions  # the run holds the adapter
    rows = activation.rows  # [start, size], None: all
    if activation.plain:
        adapted = adapter.intervene(adapted, x, alpha)
        activation.acted = True
        cloned = False  # a fresh tensor now, which a formula's backward may keep: clone before writing rows into it
        return adapted, cloned, spans
    if activation.source is not None:  # a swap (`RotatedSpace`): pairs these rows with the source's (see `swap_in`)
        swapped = swap_in(activation, adapter, adapted, target, batcher, controller)
        if swapped is not adapted:  # `swap_in` returns a fresh tensor, or `adapted` on a pass with none of its tokens
            adapted, cloned, activation.acted = swapped, False, True
        return adapted, cloned, spans
    start, size = rows if rows is not None else (0, batcher.total)
    chosen = True if spec is None else _chosen_tokens(spec, start, size, target.device, batcher, controller)
    if chosen is False:
        return adapted, cloned, spans  # none of this pass's tokens (a generation step before or after the chosen ones)
    activation.acted = True
    if rows is None and chosen is True and not getattr(adapter, "reads_positions", False):  # every token of every row
        adapted = adapter.intervene(adapted, x, alpha)
        cloned = False
        return adapted, cloned, spans
    check_batch_axis(adapter, target, batcher.total, controller.path)
    if spans is None:
        spans = _row_spans(target, x, batcher, controller)
    out_span, in_span = spans
    if chosen is not True:
        chosen = chosen.reshape(_mask_shape(target, spec, size, out_span, batcher, controller))
    if rows is None:  # the whole batch: no rows to copy out and back in
        changed = _intervene(adapter, adapted, x, alpha, spec, start, size, out_span, batcher, controller)
        adapted = changed if chosen is True else torch.where(chosen, changed, adapted)
        cloned = False
        return adapted, cloned, spans
    if not cloned:  # in-place row updates on a fresh tensor keep autograd exact
        adapted, cloned = adapted.clone(), True
    rows_out = adapted.narrow(0, start * out_span, size * out_span)
    rows_x = x.narrow(0, start * in_span, size * in_span) if isinstance(x, torch.Tensor) else x
    if getattr(adapter, "reads_output", False):
        # A formula whose backward keeps `output` (LoReFT's `R h`) must not see the view
        # that `copy_` below overwrites: autograd would refuse the changed tensor.
        rows_out = rows_out.clone()
    changed = _intervene(adapter, rows_out, rows_x, alpha, spec, start, size, out_span, batcher, controller)
    if chosen is not True:
        changed = torch.where(chosen, changed, rows_out)
    adapted.narrow(0, start * out_span, size * out_span).copy_(changed)
    return adapted, cloned, spans


def check_batch_axis(adapter: Any, target: torch.Tensor, total: int, path: str) -> None:
    """Refuse rows or tokens on an output whose batch is not dim 0, as the model's scan found (see `layout`).

    A time-first output ``(T, B, H)`` with ``T == B`` has the shape of a
    batch-first one; the scan, run on a batch whose size and lengths differ,
    tells them apart. Where the scan could not run, such a square output is
    refused too, since which axis holds the rows cannot be known.
    """
    axis = getattr(adapter, "batch_axis", BATCH_FIRST)
    if axis == BATCH_FIRST or (axis != TIME_FIRST and not (axis is None and target.dim() >= 3 and target.shape[0] == target.shape[1] == total)):
        return
    why = (
        "it is time-first, (tokens, rows, ...), as a scan of the model on a batch whose size and "
        "length differ found (FSMT's layers are)"
        if axis == TIME_FIRST
        else f"it is {tuple(target.shape)}, with as many tokens as rows, and the model could not be "
        f"scanned for which axis holds the rows"
    )
    raise ValueError(
        f"Cannot scope the intervention on `{path}` to its invoke's rows or tokens: {why}. Rows and "
        f"positions are chosen only on a batch-first (B, T, ...) or flattened (B*T, ...) output. "
        f"Adapt the whole batch instead: switch it on inside an empty `tracer.invoke()` (or in a "
        f"trace with a single invoke), with no `positions=`."
    )


def _intervene(
    adapter: Any, output: torch.Tensor, x: Any, alpha: float, spec: PositionSpec | None, start: int, size: int, span: int, batcher: Any, controller: AdapterController
) -> torch.Tensor:
    """``adapter.intervene`` on rows ``[start, start + size)``, told each token's position if it asks (`SoftPrompt`)."""
    if spec is not None and getattr(adapter, "reads_positions", False):  # which vector goes where
        columns = _pass_positions(output, spec, start, size, span, batcher, controller)
        return adapter.intervene(output, x, alpha, positions=columns, spec=spec)
    return adapter.intervene(output, x, alpha)


def _row_spans(output: torch.Tensor, x: Any, batcher: Any, controller: AdapterController) -> tuple[int, int]:
    """How many dim-0 entries each batch row owns in the output and the input, or a clear refusal."""
    total, lengths = batcher.total, pass_lengths(batcher)
    out_span = row_span(output, total, lengths)
    in_span = row_span(x, total, lengths) if isinstance(x, torch.Tensor) else 0
    if out_span is None or in_span is None:
        options = {**batcher.kwargs, **batcher.extra_kwargs}
        raise layout_error(controller.path, x if isinstance(x, torch.Tensor) else output, output, total, lengths, options)
    return out_span, in_span


def _chosen_tokens(spec: PositionSpec, start: int, size: int, device: torch.device, batcher: Any, controller: AdapterController) -> bool | torch.Tensor:
    """Which tokens of rows ``[start, start + size)`` of this pass ``spec`` picks: all (``True``), none (``False``), or a ``(size, width)`` mask.

    Worked out once per pass, rows and ``positions=``, and shared by every
    module of the pass. A pass where it picks every token or none (each
    generation step, for most choices) then costs the adapted modules no index
    operation at all, and no more Python than a few dictionary reads.
    """
    notes = batcher.__dict__.get(NOTE) or {}
    current = notes.get("pass")
    if current is None:
        raise ValueError(
            f"`positions={spec.text}` on `{controller.path}`: the token positions of this pass are "
            f"unknown (the model's inputs carry no token ids or embeddings this package can read). "
            f"Drop `positions=` to act on every token."
        )
    pass_start, width = current
    masks = notes.setdefault("masks", {})
    key = (pass_start, width, start, size, spec.ints, spec.start, spec.stop, spec.step, spec.ends, device)  # a mask lives on one device
    chosen = masks.get(key)
    if chosen is None:
        chosen = masks[key] = _pass_mask(spec, notes, pass_start, width, start, size, device, controller.path)
    return chosen


def _pass_mask(spec: PositionSpec, notes: dict, pass_start: int, width: int, start: int, size: int, device: torch.device, path: str) -> bool | torch.Tensor:
    """`_chosen_tokens`' answer, worked out: in plain Python for a small pass whose positions follow from the rows' lengths, else with `position_mask`."""
    generating = notes.get("generating", False)
    if size * width <= PYTHON_MASK_TOKENS:
        lengths, left_padded, prompt_width = prompt_shape(notes)
        picked = python_mask(spec, lengths[start : start + size], prompt_width, pass_start, width, generating, left_padded)
        if picked is not None:
            count = sum(map(sum, picked))  # tokens picked
            return True if count == size * width else False if count == 0 else torch.tensor(picked, device=device)
    prompt_mask = notes["prompt_mask"]
    columns = _pass_columns(notes, pass_start, width, start, size)
    mask = position_mask(spec, prompt_mask[start : start + size], pass_start, width, generating, path, position=columns)
    return True if bool(mask.all()) else False if not bool(mask.any()) else mask.to(device)


def _pass_columns(notes: dict, pass_start: int, width: int, start: int, size: int) -> torch.Tensor:
    """`column_positions` of rows ``[start, start + size)`` for this pass, worked out once per pass (on the CPU)."""
    cached = notes.setdefault("columns", {})
    key = (pass_start, width, start, size)
    columns = cached.get(key)
    if columns is None:
        prompt_mask = notes["prompt_mask"]
        lengths, left_padded, prompt_width = prompt_shape(notes)
        if size * width <= PYTHON_MASK_TOKENS and (left_padded or pass_start >= prompt_width):
            columns = torch.tensor(python_columns(lengths[start : start + size], prompt_width, pass_start, width))
        else:
            columns = column_positions(prompt_mask[start : start + size], pass_start, width)
        cached[key] = columns
    return columns


def _mask_shape(original: torch.Tensor, spec: PositionSpec, size: int, span: int, batcher: Any, controller: AdapterController) -> tuple[int, ...]:
    """The shape a ``(size, width)`` mask of this pass takes to broadcast over ``original``'s rows, or a clear refusal."""
    width = batcher.__dict__[NOTE]["pass"][1]
    if span == 1 and original.dim() >= 3 and original.shape[1] == width:
        return (size, width) + (1,) * (original.dim() - 2)  # batch-first (rows, t, ...)
    if span == width:
        return (size * width,) + (1,) * (original.dim() - 1)  # flattened (rows * t, ...)
    raise ValueError(
        f"`positions={spec.text}` on `{controller.path}`: its output {tuple(original.shape)} has "
        f"no token axis of this pass's {width} tokens to choose from. Put the intervention on "
        f"a module whose output is (batch, tokens, ...), or drop `positions=`."
    )


def _pass_positions(
    original: torch.Tensor, spec: PositionSpec, start: int, size: int, span: int, batcher: Any, controller: AdapterController
) -> torch.Tensor:
    """Each token's position among its row's real tokens (-1 on padding), shaped to broadcast over ``original``."""
    notes = batcher.__dict__[NOTE]  # `_chosen_tokens` has checked the pass is known
    pass_start, width = notes["pass"]
    shape = _mask_shape(original, spec, size, span, batcher, controller)
    columns = _pass_columns(notes, pass_start, width, start, size)  # (size, width), on the CPU
    return (columns if columns.device == original.device else columns.to(original.device)).reshape(shape)


def replace_first_tensor(output: Any, value: torch.Tensor) -> Any:
    """``output`` with the tensor `first_tensor` found replaced by ``value``."""
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, dict):  # ModelOutput: a fresh copy with the first field set
        output = output.copy()
        output[next(iter(output))] = value
        return output
    rebuilt = [value, *output[1:]]
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        return type(output)(*rebuilt)
    return type(output)(rebuilt)


# ---------------------------------------------------------------------------
# Switching an adapter on from inside a trace
# ---------------------------------------------------------------------------


def current_mediator(what: str, hint: str = "") -> "Mediator":
    """The invoke whose code is running now, or a clear error outside a trace.

    ``what`` is the call that was made (``"steer()"``); ``hint`` what else that
    kind can do instead (a kind that merges says so).
    """
    ref = getattr(getcurrent(), "mediator", None)
    mediator = ref() if ref is not None else None
    if mediator is None or mediator.worker is None:
        raise RuntimeError(
            f"`{what}` must be called inside `model.trace(...)`, `model.generate(...)` "
            f"or a `tracer.invoke(...)` block: it switches the intervention on for that run. "
            f"In a trace with explicit invokes, code outside them is not part of any "
            f"invoke: call it inside the invoke whose rows it should change (an empty "
            f"`tracer.invoke()` covers the whole batch)." + (f" {hint}" if hint else "")
        )
    return mediator


def row_alphas(alpha: Any, kinds: Any, call: str, means: str) -> Any:
    """``alpha`` checked: a float, or, as a 1-D sequence, one value per row (a float64 tensor) where every one of ``kinds`` takes that (`grouped`)."""
    if isinstance(alpha, (torch.Tensor, list, tuple)) and not (isinstance(alpha, torch.Tensor) and alpha.dim() == 0):
        refused = sorted({kind.__name__ for kind in kinds if not grouped.opts_in(kind)})
        if refused:
            raise ValueError(
                f"`{call}` was given {f'a tensor of shape {tuple(alpha.shape)}' if isinstance(alpha, torch.Tensor) else repr(alpha)[:80]} "
                f"as `alpha`: one alpha per row is taken by `LORA` and `SteeringVector`, not by "
                f"{', '.join(f'`{name}`' for name in refused)}. Pass one number, or give each strength its own invoke."
            )
        return grouped.check_row_alphas(alpha, call, means)
    return check_alpha(alpha, call, means)


def check_alpha(alpha: Any, call: str = "", means: str = "the strength of the intervention") -> float:
    """``alpha`` as a float, or a clear error naming ``call`` (``"adapters()"``) and what alpha ``means`` there."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        example = f" Pass e.g. `{call[:-1]}alpha=1.0)`; 0 switches it off for this invoke." if call.endswith("()") else ""
        raise ValueError(f"`alpha` must be a finite number ({means}), got {alpha!r}.{example}")
    return float(alpha)


def last_pass(steps: Any) -> int | None:
    """The last pass index `normalize_steps`' container holds (-1 if none), ``None`` for every pass.

    Examples:
        >>> last_pass(normalize_steps(slice(0, 3))), last_pass(normalize_steps({4, 1})), last_pass(None)
        (2, 4, None)
    """
    if steps is None:
        return None
    if isinstance(steps, range):
        return steps[-1] if len(steps) else -1
    return max(steps, default=-1)


def normalize_steps(steps: Steps) -> Any:
    """``None``, or a container of forward-pass indices supporting ``in``."""
    if steps is None:
        return None
    if isinstance(steps, slice):
        start, stop, step = steps.start, steps.stop, steps.step
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (start, stop, step)):
            raise ValueError(f"`steps` as a slice takes ints (or None), got {steps!r}. Pass e.g. `slice(1, None)`.")
        if (start or 0) < 0 or (stop is not None and stop < 0):
            raise ValueError(f"`steps` cannot hold negative steps, got {steps!r}.")
        if step is not None and step < 1:  # `step or 1` would read 0 as 1; a negative step picks no pass
            raise ValueError(
                f"`steps` as a slice needs a positive step, got {steps!r}. Pass e.g. "
                f"`slice(0, 10, 2)` for every other pass, or `slice(0, 10)` for each."
            )
        return range(start or 0, sys.maxsize if stop is None else stop, step or 1)
    if isinstance(steps, range):
        return steps
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = (steps,)
    try:
        chosen = frozenset(steps)
    except TypeError:
        chosen = None
    if chosen is None or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in chosen):
        raise ValueError(
            f"`steps` must be a non-negative int, a slice such as `slice(2, None)`, a "
            f"range, or an iterable of non-negative ints (0 is the prefill), got {steps!r}."
        )
    return chosen


def activate(adapter: Any, envoy: "Envoy", alpha: float, steps: Any, what: str, positions: PositionSpec | None = None) -> None:
    """Switch ``adapter`` on for the running invoke, on ``envoy``'s module.

    ``adapter`` is any object with ``intervene(output, x, alpha) -> new output``
    (see `Optimization`). Calling again from the same invoke updates ``alpha``,
    ``steps`` and ``positions`` in place; the adapter never applies twice to the same row.
    """
    activate_many([(adapter, envoy, positions)], alpha, steps, what, stacklevel=6)


def activate_many(
    switches: list[tuple[Any, Envoy, PositionSpec | None]],
    alpha: float,
    steps: Any,
    what: str,
    *,
    stacklevel: int = 5,
) -> None:
    """`activate` for several ``(adapter, envoy, positions)`` of one model, sharing the per-call work.

    The invoke, its run and the pass count are looked up once, not once per adapter.
    ``stacklevel`` points a warning at the user's call: this function, the
    adapter's ``forward`` and torch's two ``Module.__call__`` frames lie between.
    """
    mediator = current_mediator(what)
    interleaver = mediator.interleaver
    rows = mediator.batch_group if interleaver.batcher is not None and interleaver.batcher.batching else None
    if type(alpha) is not float:  # one alpha per row (`row_alphas`): as many as the invoke has rows
        size = rows[1] if rows is not None else getattr(interleaver.batcher, "total", None)
        if size is not None and size != alpha.shape[0]:
            raise ValueError(
                f"`{what}` was given {alpha.shape[0]} alphas, one per row, but the invoke it was called "
                f"in has {size} row(s) in this run. Give one alpha per prompt of the invoke (e.g. "
                f"`alpha=torch.linspace(0, 2, {size})`), or one number for all of them."
            )
    root_input = passes = None
    checked = noted = False  # positions checked, and the run's sequence lengths noted, once per call
    made = []  # the new activations and their paths, watched together (see `acted`)
    group = object() if len(switches) > 1 else None  # a collection's members, for the run's-end check (`acted`)
    for adapter, envoy, positions in switches:
        if envoy.interleaver is not interleaver:
            raise RuntimeError(
                f"`{what}` was called inside a trace of a different model than the one "
                f"its module `{envoy.path}` belongs to. Build the adapter on a module of "
                f"the model you are tracing."
            )
        if root_input is None:  # one interleaver, so one model and one root for every switch
            # The root's path is the first part of the module's: an envoy unpickled on a
            # remote server travels without its parent, so `envoy.root` would be itself.
            root_input = f"{envoy.path.split('.', 1)[0]}.input"
            passes = _passes_begun(mediator, root_input)
        if positions is not None and not checked:
            _check_positions_can_be_known(positions, envoy, interleaver, mediator, root_input, what)
            checked = True
        if not noted and (rows is not None or positions is not None):  # the run's sequence lengths tell layouts and positions apart
            _note_lengths_of_run(envoy, interleaver)
            noted = True
        controller = _adapter_controller(envoy)
        activation = _switch_on(controller, adapter, alpha, steps, mediator, rows, root_input, envoy.path, positions, what, group)
        is_new = activation is not None
        if is_new:
            made.append((activation, envoy.path))
        if positions is not None:
            Standby.of(interleaver.batcher.__dict__.setdefault(NOTE, {})).enrol(controller)
        if is_new and passes:
            if mediator.occurrence(f"{envoy.path}.input") >= passes:
                warnings.warn(
                    f"`{what}` was called after `{envoy.path}` had already run in this forward "
                    f"pass, so it changes nothing in this pass and acts from the next one (the "
                    f"next generation step). To adapt this pass, call it before reading the "
                    f"`.output` of `{envoy.path}` or of any module after it.",
                    stacklevel=stacklevel,
                )
    watch(made, interleaver, mediator)  # a run that ends with one having acted on nothing raises (see `acted`)


def _adapter_controller(envoy: "Envoy") -> AdapterController:
    """The module's `AdapterController`, installed in place of nnsight's controller if need be."""
    module = envoy._module
    controller = set_aside_other_copies(module.__dict__.get("forward"))
    if isinstance(controller, AdapterController):
        return controller
    batcher = envoy.interleaver.batcher
    standby = (batcher.__dict__.get(NOTE) or {}).get(STANDBY) if batcher is not None else None
    resting = standby.wake(module) if standby is not None else None
    if resting is not None:  # resting in this run (see `standby`): its activations come back with it
        return resting
    if not isinstance(controller, Controller):
        raise RuntimeError(
            f"`{envoy.path}` has no nnsight controller as its forward (found "
            f"{type(controller).__name__}); something replaced `forward` after "
            f"nnsight wrapped the model. Wrap the model again after that change."
        )
    controller = AdapterController(controller)
    module.__dict__["forward"] = controller
    return controller


def _switch_on(
    controller: AdapterController,
    adapter: Any,
    alpha: float,
    steps: Any,
    mediator: "Mediator",
    rows: list | None,
    root_input: str,
    path: str,
    positions: PositionSpec | None = None,
    what: str = "the intervention",
    group: Any = None,
) -> "Activation | None":
    """Add (or update) ``adapter``'s activation for ``mediator``: the new activation, or ``None`` if it was there."""
    interleaver = mediator.interleaver
    # Activations of finished runs are dropped here, not only when the module
    # next runs idle: a training loop calls `lora()` in every run. Once per run:
    # within a run no activation dies (nnsight drops the workers when it ends), and
    # each invoke's switch-on then costs the lookup of its adapter, not a pass over
    # every invoke's activations (K x K at K invokes).
    batcher = interleaver.batcher
    if controller.plans:
        controller.plans = {}  # what is live on the module changes: plan it again (see `add_deltas`)
    if controller.pruned_for is None or controller.pruned_for() is not batcher:
        controller.activations = [a for a in controller.activations if a.live_mediator(interleaver) is not None]
        by_adapter: dict = {}
        for activation in controller.activations:
            by_adapter.setdefault(id(activation._adapter()), []).append(activation)
        controller.by_adapter = by_adapter
        controller.pruned_for = weakref.ref(batcher) if batcher is not None else None
    for activation in controller.by_adapter.get(id(adapter), ()):
        if activation.adapter is not adapter:
            continue
        other = activation.live_mediator(interleaver)
        if other is None:
            continue
        if other is mediator:
            activation.update(alpha, steps, positions)
            _count_repeat_call(activation, mediator, path)
            return None
        other_rows = other.batch_group if rows is not None else None
        if rows is None or other_rows is None or _overlap(rows, other_rows):
            raise RuntimeError(
                f"The adapter on `{path}` is already switched on for some of the "
                f"same rows by another invoke of this run (an empty `tracer.invoke()` "
                f"covers the whole batch). An adapter applies at most once per row: "
                f"call it in only one of the two invokes."
            )
    activation = Activation(adapter, alpha, steps, mediator, root_input, positions, rows)
    activation.what, activation.group = what, group
    controller.activations.append(activation)
    controller.by_adapter.setdefault(id(adapter), []).append(activation)
    return activation


def _count_repeat_call(activation: Activation, mediator: "Mediator", path: str) -> None:
    """Refuse a loop that calls the adapter again and again while no forward pass runs."""
    passes = mediator.occurrence(activation.root_input)
    if activation.calls_pass != passes:
        activation.calls, activation.calls_pass = 1, passes
        return
    activation.calls += 1
    if activation.calls > MAX_CALLS_PER_PASS:
        raise RuntimeError(
            f"The adapter on `{path}` was switched on {MAX_CALLS_PER_PASS} times by one invoke "
            f"while no forward pass ran. A loop whose body only calls the adapter, such as "
            f"`for step in tracer.all(): lora()`, never waits for the model, so it would never "
            f"end. The adapter already acts on every generation step: call `lora()` once, with "
            f"no loop. To read values step by step, keep the loop and read one inside it "
            f"(`for step in tracer.all(): lora(); h = model.lm_head.output.save()`)."
        )


def _check_positions_can_be_known(
    positions: PositionSpec, envoy: "Envoy", interleaver: "Interleaver", mediator: "Mediator", root_input: str, what: str
) -> None:
    """``positions=`` needs a decoder-only model and the prompt's mask, noted at the first pass."""
    root = _root_envoy(envoy, interleaver)
    if root is not None and getattr(getattr(root._module, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"`{what}` with `positions={positions.text}`: positions are counted over a decoder-only "
            f"model's tokens; an encoder-decoder has two sequences, and choosing among them is not "
            f"supported. Drop `positions=` to act on every token."
        )
    notes = interleaver.batcher.__dict__.get(NOTE) or {} if interleaver.batcher is not None else {}
    if mediator.occurrence(root_input) > 0 and "prompt_mask" not in notes:
        raise ValueError(
            f"`{what}` with `positions={positions.text}` was called after the first forward pass "
            f"began, so which tokens are real cannot be known any more. Call it first thing in the "
            f"invoke, before reading any module's `.output`."
        )


def _note_lengths_of_run(envoy: "Envoy", interleaver: "Interleaver") -> None:
    """Have the root (and an encoder-decoder's encoder) note each pass's sequence lengths in this run."""
    root = _root_envoy(envoy, interleaver)
    if root is None:
        return  # no root to note at: only batch-first layouts will be accepted
    hf_model = root._module
    encoder_decoder = bool(getattr(getattr(hf_model, "config", None), "is_encoder_decoder", False))
    _adapter_controller(root).note_for(interleaver.batcher, "root", encoder_decoder)
    get_encoder = getattr(hf_model, "get_encoder", None)
    if encoder_decoder and callable(get_encoder):
        encoder = interleaver.envoys.get(id(get_encoder()))
        if encoder is not None and encoder is not root:
            _adapter_controller(encoder).note_for(interleaver.batcher, "encoder", encoder_decoder)


def _root_envoy(envoy: "Envoy", interleaver: "Interleaver") -> "Envoy | None":
    root_path = envoy.path.split(".", 1)[0]
    root = envoy.root
    if root.path == root_path:
        return root
    # An envoy unpickled on a remote server travels without its parent.
    return next((e for e in interleaver.envoys.values() if e.path == root_path), None)


def _overlap(a: list, b: list) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def _passes_begun(mediator: "Mediator", root_input: str) -> int:
    """The forward passes begun so far if one is running now, else 0.

    Counts handoffs since the invoke started: the root model's input fires once
    per pass and its output once the pass ends. A module entered as often as
    the root has been has run in the current pass (`activate_many` warns); a
    module that runs several times per pass is judged by its first run.
    """
    passes = mediator.occurrence(root_input)
    root_output = root_input[: -len(".input")] + ".output"
    return passes if passes > mediator.occurrence(root_output) else 0


# ---------------------------------------------------------------------------
# Swaps: a source's values paired into a base's rows and tokens (`RotatedSpace`)
# ---------------------------------------------------------------------------
#
# Distributed alignment search runs a *source* and a *base* through the model
# and swaps part of the source's representation into the base's. In nnsight
# both are invokes of one batch, so the adapted module's controller sees their
# rows in one output: `read_source` (in the source's invoke) records which rows
# and tokens to read, `activate_swap` (in the base's) switches the swap on with
# that record as the activation's ``source``, and `swap_in` pairs them at every
# chosen pass. Only activations that have a source take this path: the other
# kinds keep theirs, and pay nothing for it but a switch-on's one attribute.

#: ``positions=None`` on a module with a token axis: every real token of each row.
EVERY_TOKEN = normalize_positions(slice(None))


class SwapSource:
    """Which rows and tokens of a module's output one invoke offers as a swap's source (`RotatedSpace.source`).

    Holds the run's batcher weakly: it identifies the run, and a record must
    not keep a finished run alive. The values themselves are read at each
    forward pass, from the module's own output on these rows before any
    intervention on that module applies, so gradients flow back into the
    source's run as well.
    """

    __slots__ = ("path", "rows", "positions", "batcher", "what")

    def __init__(self, path: str, rows: list | None, positions: PositionSpec | None, batcher: Any, what: str) -> None:
        self.path = path  # the module whose output is read
        self.rows = rows  # [start, size] of the run's batch, None: all of it
        self.positions = positions  # None: every real token (or the whole row, on a module with no token axis)
        self.batcher = weakref.ref(batcher) if batcher is not None else None
        self.what = what

    def __repr__(self) -> str:
        rows = "every row" if self.rows is None else f"rows {self.rows[0]}..{self.rows[0] + self.rows[1] - 1}"
        where = "" if self.positions is None else f", positions={self.positions.text}"
        return f"SwapSource({self.path}, {rows}{where})"


def read_source(envoy: "Envoy", positions: PositionSpec | None, what: str) -> SwapSource:
    """The `SwapSource` of the running invoke's rows and ``positions`` on ``envoy``'s module."""
    mediator = current_mediator(what)
    interleaver = mediator.interleaver
    if envoy.interleaver is not interleaver:
        raise RuntimeError(
            f"`{what}` was called inside a trace of a different model than the one its module "
            f"`{envoy.path}` belongs to. Build the intervention on a module of the model you are tracing."
        )
    batcher = interleaver.batcher
    rows = mediator.batch_group if batcher is not None and batcher.batching else None
    if positions is not None:
        root_input = f"{envoy.path.split('.', 1)[0]}.input"
        _check_positions_can_be_known(positions, envoy, interleaver, mediator, root_input, what)
    _note_lengths_of_run(envoy, interleaver)  # real tokens and layouts are told apart from the run's lengths
    return SwapSource(envoy.path, rows, positions, batcher, what)


def activate_swap(adapter: Any, envoy: "Envoy", alpha: float, steps: Any, what: str, positions: PositionSpec | None, source: Any) -> None:
    """Switch ``adapter``'s swap on for the running invoke: ``source`` (a `SwapSource` or a tensor) into its rows and ``positions``."""
    mediator = current_mediator(what)
    interleaver = mediator.interleaver
    batcher = interleaver.batcher
    rows = mediator.batch_group if batcher is not None and batcher.batching else None
    if isinstance(source, SwapSource):
        _check_source_pairs(source, envoy, rows, batcher, what)
    activate_many([(adapter, envoy, positions)], alpha, steps, what, stacklevel=7)
    _note_lengths_of_run(envoy, interleaver)
    controller = _adapter_controller(envoy)
    for activation in controller.activations:
        if activation.adapter is adapter and activation.live_mediator(interleaver) is mediator:
            activation.source = source
            activation.plain = False  # a swap always pairs rows: never `add_deltas`' plain branch
            return
    raise RuntimeError(f"`{what}`: the swap on `{envoy.path}` was not switched on; this is a bug in nnsight-toolbox.")


def _check_source_pairs(source: SwapSource, envoy: "Envoy", rows: list | None, batcher: Any, what: str) -> None:
    """A `SwapSource` must come from this run and this module, with one row or as many rows as the base."""
    if source.path != envoy.path:
        raise ValueError(
            f"`{what}` on `{envoy.path}` was given a source read on `{source.path}` "
            f"(`{source.what}`). A swap pairs values of one module's output: read the source with "
            f"the `.source()` of an intervention on `{envoy.path}`, or pass a tensor."
        )
    if source.batcher is None or source.batcher() is not batcher:
        raise ValueError(
            f"`{what}` was given a source read in another trace (`{source.what}`). A source "
            f"handle pairs rows of one batch: read it in an invoke of this trace, or save the "
            f"values there (`module.output[...].save()`) and pass that tensor."
        )
    total = batcher.total if batcher is not None else None
    base_size = rows[1] if rows is not None else total
    source_size = source.rows[1] if source.rows is not None else total
    if source_size != 1 and source_size != base_size:
        raise ValueError(
            f"`{what}` on `{envoy.path}`: the source invoke has {source_size} rows and this one "
            f"{base_size}. Row i of the base pairs with row i of the source, and a one-row source "
            f"goes to every base row: give both invokes as many prompts, or the source one."
        )


def swap_in(
    activation: Activation, adapter: Any, adapted: torch.Tensor, target: torch.Tensor, batcher: Any, controller: AdapterController
) -> torch.Tensor:
    """``adapted`` with ``adapter.swap(base, source, alpha)`` written into the base's rows and tokens of this pass.

    ``target`` is the module's own output (before any intervention on it): the
    source is read from it. On a module with a token axis ``(B, T, d)``, each
    row's chosen tokens are gathered in token order, ``(rows, n, d)``; the
    source's count must equal the base's or be 1 (then it goes to every base
    token). On a module without one ``(B, d)`` a row is one value.
    """
    source, alpha = activation.source, activation.alpha
    total = batcher.total
    check_batch_axis(adapter, target, total, controller.path)
    start, size = activation.rows if activation.rows is not None else (0, total)
    notes = batcher.__dict__.get(NOTE) or {}
    current = notes.get("pass")
    path = controller.path
    if target.dim() >= 3 and target.shape[0] == total and current is not None and target.shape[1] == current[1]:
        return _swap_tokens(activation, adapter, adapted, target, source, alpha, start, size, batcher, controller)
    if target.dim() == 2 and target.shape[0] == total:
        for spec, whose in ((activation.positions, "base"), (getattr(source, "positions", None), "source")):
            if spec is not None:
                raise ValueError(
                    f"`positions={spec.text}` for the {whose} of the swap on `{path}`: its output "
                    f"{tuple(target.shape)} is (rows, features), with no token axis to choose from. "
                    f"Drop `positions=` on both `.source()` and the swap: they then act on whole rows."
                )
        base = adapted.narrow(0, start, size)  # (size, d)
        if isinstance(source, SwapSource):
            s_start, s_size = source.rows if source.rows is not None else (0, total)
            values = target.narrow(0, s_start, s_size)  # (s_size, d)
        else:
            values = _source_tensor(source, (size, target.shape[-1]), path, "(rows, d)", target)
        changed = adapter.swap(base, values.expand_as(base), alpha)
        if size == total:
            return changed
        return torch.cat([adapted.narrow(0, 0, start), changed, adapted.narrow(0, start + size, total - start - size)])
    raise ValueError(
        f"The swap on `{path}` cannot tell its rows and tokens apart: the pass has {total} rows"
        f"{'' if current is None else f' of {current[1]} tokens'}, and the module returned "
        f"{tuple(target.shape)}. A swap acts on a batch-first (rows, tokens, d) or (rows, d) "
        f"output; put it on such a module (a decoder layer, an MLP's output)."
    )


def _swap_tokens(
    activation: Activation, adapter: Any, adapted: torch.Tensor, target: torch.Tensor, source: Any, alpha: float,
    start: int, size: int, batcher: Any, controller: AdapterController,
) -> torch.Tensor:
    """`swap_in` on a ``(B, T, d)`` output: gather the paired tokens, swap, scatter back."""
    device, path = target.device, controller.path
    width = target.shape[1]
    chosen = _chosen_tokens(activation.positions or EVERY_TOKEN, start, size, device, batcher, controller)
    if chosen is False:
        return adapted  # none of the base's tokens in this pass (a generation step past them)
    base_cols = _columns_of(chosen, size, width, device, path, "base", activation.positions)  # (size, n)
    n = base_cols.shape[1]
    d = target.shape[-1]
    if isinstance(source, SwapSource):
        s_start, s_size = source.rows if source.rows is not None else (0, batcher.total)
        picked = _chosen_tokens(source.positions or EVERY_TOKEN, s_start, s_size, device, batcher, controller)
        if picked is False:
            raise ValueError(
                f"The swap on `{path}` acts on {n} token(s) of this pass, but the source's "
                f"`positions={(source.positions or EVERY_TOKEN).text}` holds none of them (in "
                f"`generate`, each step after the prefill holds only the new token). Choose "
                f"`steps=` for the swap that the source's positions are in (e.g. `steps=0`, the "
                f"prefill), or source positions every such step has (`slice(-1, None)`)."
            )
        source_cols = _columns_of(picked, s_size, width, device, path, "source", source.positions)  # (s_size, n_s)
        if source_cols.shape[1] not in (1, n):
            raise ValueError(
                f"The swap on `{path}`: the source's `positions={(source.positions or EVERY_TOKEN).text}` "
                f"picks {source_cols.shape[1]} token(s) per row and the base's "
                f"`positions={(activation.positions or EVERY_TOKEN).text}` {n}. They pair in token "
                f"order, so the counts must match, or the source must give one token to go to every "
                f"base token. Choose positions that pick as many tokens in both."
            )
        source_rows = torch.arange(s_start, s_start + s_size, device=device)[:, None]  # (s_size, 1)
        values = target[source_rows, source_cols]  # (s_size, n_s, d)
    else:
        values = _source_tensor(source, (size, n, d), path, "(rows, positions, d)", target)
    rows = torch.arange(start, start + size, device=device)[:, None].expand(size, n)  # (size, n)
    base = adapted[rows, base_cols]  # (size, n, d): a copy, which the swap's backward may keep
    changed = adapter.swap(base, values.expand(size, n, d), alpha)
    return adapted.index_put((rows, base_cols), changed)  # out of place: autograd reaches both runs


def _columns_of(chosen: Any, size: int, width: int, device: torch.device, path: str, whose: str, spec: PositionSpec | None) -> torch.Tensor:
    """The columns a ``(size, width)`` choice picks in each row, in token order: ``(size, n)``, or a refusal if rows differ in ``n``."""
    if chosen is True:
        return torch.arange(width, device=device).expand(size, width)
    counts = chosen.sum(1)  # (size,)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"The swap on `{path}`: the {whose}'s `positions={(spec or EVERY_TOKEN).text}` picks "
            f"{counts.tolist()} tokens in its rows; a swap pairs the same number of tokens in every "
            f"row. Choose positions every row has as many of (e.g. `-1`, or `[0, -1]`), or put "
            f"prompts of other lengths in another pair of invokes."
        )
    return chosen.nonzero()[:, 1].reshape(size, int(counts[0]))  # row-major: each row's columns in order


def _source_tensor(source: torch.Tensor, shape: tuple, path: str, layout: str, target: torch.Tensor) -> torch.Tensor:
    """A source tensor, on ``target``'s device, broadcast to ``shape``, or a refusal naming both shapes."""
    if source.dim() > len(shape) or any(s not in (1, want) for s, want in zip(source.shape[::-1], shape[::-1])):
        raise ValueError(
            f"The swap on `{path}` was given a source tensor of shape {tuple(source.shape)}, which "
            f"does not go to this pass's {shape} {layout}: each dimension must match or be 1 (a "
            f"one-row source goes to every row, a one-position source to every position)."
        )
    if source.device != target.device:
        source = source.to(target.device)
    return source.expand(shape)
