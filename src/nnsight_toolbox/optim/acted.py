"""Never a silent no-op: a run that ends with an intervention that acted on nothing raises.

An intervention switched on in a run can fail to act without any error along
the way: its module never runs (a module on a branch the forward does not
take), its ``steps=`` lie past the last generation step, its ``positions=``
past every row's last token, or it was switched on after its module had run in
the run's last pass. The run's numbers then equal the base model's, and a
study would report a null result that was never measured.

So every activation records whether it acted (`Activation.acted`, set where
the delta is applied in `activation`), each new one is watched for its run
(`watch`), and once the model has finished, `check_run` raises a
`RuntimeError` that names each intervention that acted on nothing, what it
asked for, and what the run had.

When the check runs. nnsight's driver (``Envoy.interleave``) calls the run's
``Interleaver.check_dangling_mediators`` once the model has returned; `watch`
puts a wrapper of it on that interleaver, for this run only, which runs the
check after it. A run that raised never gets there, and one that ``tracer.stop()``
ended early is not checked either: the model's ``result`` was never reached,
and modules after the stop were not meant to run.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any

from .rows import NOTE, prompt_shape

if TYPE_CHECKING:
    from nnsight.intervention.interleaver import Interleaver

    from .activation import Activation

#: The key, in the run's notes (`rows.NOTE`), of the activations it watches.
WATCH = "watch"

#: The interleaver attribute that the wrapper shadows for one run.
CHECK = "check_dangling_mediators"


def watch(made: list, interleaver: "Interleaver", mediator: Any) -> None:
    """Check, once the run ends, that each new ``(activation, path)`` of one call (switched on by ``mediator``) acted."""
    batcher = interleaver.batcher
    if batcher is None or not made:
        return
    notes = batcher.__dict__.get(NOTE)
    if notes is None:
        notes = batcher.__dict__[NOTE] = {}
    watched = notes.get(WATCH)
    if watched is None:
        watched = notes[WATCH] = []
        _check_at_end(interleaver, batcher)
    occurrence = mediator.occurrence
    for activation, path in made:
        watched.append((activation, path, occurrence(f"{path}.input")))


def _check_at_end(interleaver: "Interleaver", batcher: Any) -> None:
    """Shadow ``interleaver.check_dangling_mediators`` for this run with one that runs `check_run` after it."""
    run = weakref.ref(batcher)
    owner = weakref.ref(interleaver)
    results_before = interleaver.counts.get("result", 0)
    original = type(interleaver).check_dangling_mediators

    def check_dangling_mediators() -> None:
        this = owner()
        this.__dict__.pop(CHECK, None)  # for this run only
        original(this)
        finished = this.counts.get("result", 0) > results_before  # the model returned: no error, no early stop
        if finished and run() is not None and run() is this.batcher:
            check_run(run(), this)

    interleaver.__dict__[CHECK] = check_dangling_mediators  # replaces a wrapper a run that raised left behind


def check_run(batcher: Any, interleaver: "Interleaver") -> None:
    """Raise a `RuntimeError` naming every watched activation of the run that acted on nothing.

    One exception: a member of a collection switched on in one call
    (``adapters()``, ``interventions()``) whose module never ran, while another
    member of that call acted. A set on every expert of a mixture-of-experts
    layer meets routed experts that no token of the run reached; the set acted.
    """
    notes = batcher.__dict__.get(NOTE) or {}
    watched = notes.get(WATCH, ())
    acted_groups = {activation.group for activation, _, _ in watched if activation.acted and activation.group is not None}
    failures = [
        why_not(activation, path, ran_before, notes)
        for activation, path, ran_before in watched
        if not activation.acted and not (activation.group in acted_groups and _never_ran(activation, path))
    ]
    if failures:
        many = len(failures) > 1
        raise RuntimeError(
            ("These interventions acted on nothing in this run:\n- " + "\n- ".join(failures)) if many else failures[0]
        )


def _never_ran(activation: "Activation", path: str) -> bool:
    mediator = activation.mediator()
    return mediator is None or mediator.occurrence(f"{path}.input") == 0


def why_not(activation: "Activation", path: str, ran_before: int, notes: dict) -> str:
    """What ``activation`` asked for and what the run had, with what to do instead."""
    what = activation.what
    mediator = activation.mediator()
    ran = mediator.occurrence(f"{path}.input") if mediator is not None else 0
    passes = mediator.occurrence(activation.root_input) if mediator is not None else 0
    if ran == 0:
        return (
            f"`{what}` on `{path}` never acted: the run ended without calling `{path}`. The "
            f"model's forward does not reach that module (a container such as a ModuleList, "
            f"a branch this model or input does not take, or a module outside this model's "
            f"forward). Put the intervention on a module the forward calls; "
            f"`print(model)` shows them."
        )
    if ran == ran_before:
        return (
            f"`{what}` on `{path}` never acted: it was switched on after `{path}` had run in "
            f"the run's last forward pass. Call it before reading the `.output` of `{path}` "
            f"or of any module after it."
        )
    asked = []
    if activation.steps is not None:
        asked.append(f"`steps={steps_text(activation.steps)}`")
    if activation.positions is not None:
        asked.append(f"`positions={activation.positions.text}`")
    had = [f"{passes} forward pass(es) (steps 0..{passes - 1}; 0 is the prefill, then one per generated token)"]
    if activation.positions is not None and "prompt_mask" in notes:
        lengths, _, width = prompt_shape(notes)
        start, size = activation.rows if activation.rows is not None else (0, len(lengths))
        last = notes.get("pass")
        generated = max(last[0] + last[1] - width, 0) if last is not None else 0
        reached = [length - 1 + generated for length in lengths[start : start + size]]
        had.append(
            f"rows with {lengths[start:start + size]} real prompt tokens, whose passes reached "
            f"positions up to {reached} (positions count each row's real tokens: 0 the first, -1 "
            f"the last prompt token, then the generated ones; the last generated token is never "
            f"passed through the model)"
        )
    return (
        f"`{what}` on `{path}` never acted: it asked for {' and '.join(asked) or 'every pass'}, and "
        f"the run had {'; '.join(had)}, so none of its chosen steps or tokens came. Ask for "
        f"steps and positions the run has, or generate more tokens (`max_new_tokens=`)."
    )


def steps_text(steps: Any) -> str:
    """A normalized ``steps=`` as the user could have written it.

    Examples:
        >>> steps_text(range(2, sys.maxsize)), steps_text(range(0, 3)), steps_text(frozenset({5, 1})), steps_text(frozenset({5}))
        ('slice(2, None)', 'slice(0, 3)', '[1, 5]', '5')
    """
    if isinstance(steps, range):
        stop = None if steps.stop == sys.maxsize else steps.stop
        return f"slice({steps.start}, {stop}{'' if steps.step == 1 else f', {steps.step}'})"
    chosen = sorted(steps)
    return str(chosen[0]) if len(chosen) == 1 else str(chosen)
