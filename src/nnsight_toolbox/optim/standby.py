"""Resting: in generation, a module whose interventions can act on no later pass gets nnsight's controller back.

With a KV cache, each pass of ``model.generate(...)`` after the prefill holds only
new tokens. An intervention whose ``positions=`` are all prompt tokens (a soft
prompt's placeholders, ``positions=-1``'s last prompt token) acts at the prefill
and then on nothing, yet its module's `AdapterController` would still work out,
at every step, that the step holds none of its tokens. So once the root has
noted a pass that lies wholly past the prompt, such a module *rests*: its
forward is nnsight's own controller again for the rest of the run, and a
generation step costs it nothing beyond what nnsight costs.

Why that cannot change a result:

- a module rests only when every intervention live on it in this run has
  ``positions=`` as a list of ints naming real prompt tokens of each of its
  rows (`can_rest`); ``steps=`` does not matter, since no step past the prompt
  holds such a token;
- a pass that starts at or past the prompt's last column holds only generated
  tokens, none of which is a prompt position, whatever the pass's width;
- a pass that holds prompt columns again (the model called without its cache)
  could hold them, and the root, which notes every pass before it runs, puts
  every resting controller back first (`Standby.review`);
- switching an intervention on again in the run wakes the module's controller
  first (`Standby.wake`, from `activation._adapter_controller`).

The standby lives in the run's notes on nnsight's per-run batcher (see
`rows.NOTE`), so nothing outlives the run. After it, the module's forward is
nnsight's controller, as any finished run leaves it.
"""

from __future__ import annotations

from typing import Any

from .rows import prompt_shape

#: The key of the run's `Standby` in the run's notes (`rows.NOTE`).
STANDBY = "standby"


class Standby:
    """The run's adapter controllers that may rest, and those resting (see the module's docstring).

    A plain class, not a dataclass: the package ships to remote servers as source.

    Examples:
        >>> standby = Standby.of({})
        >>> standby.candidates, standby.resting
        ([], [])
    """

    __slots__ = ("candidates", "resting")

    def __init__(self) -> None:
        self.candidates: list = []  # switched on with `positions=` since the last review, forward installed
        self.resting: list = []  # resting: the module's forward is the controller's `inner`

    @staticmethod
    def of(notes: dict) -> "Standby":
        """The run's standby, made on first use."""
        standby = notes.get(STANDBY)
        if standby is None:
            standby = notes[STANDBY] = Standby()
        return standby

    def enrol(self, controller: Any) -> None:
        """Have the next pass past the prompt decide whether ``controller`` rests (after a switch-on with ``positions=``)."""
        if not any(c is controller for c in self.candidates):
            self.candidates.append(controller)

    def review(self, notes: dict, interleaver: Any) -> None:
        """At the start of each pass (the root's note): wake every resting controller before a pass that holds prompt columns, else rest those that can.

        Each candidate is decided once: what decides it (its activations and the
        prompt's lengths) holds for the rest of the run, until a new switch-on enrols it again.
        """
        current = notes.get("pass")
        if current is None or current[0] < notes["prompt_width"]:  # a pass that holds prompt columns (or unknown)
            if self.resting:
                for controller in self.resting:
                    _install(controller, controller)
                self.candidates.extend(self.resting)
                self.resting.clear()
            return
        if not self.candidates or not notes.get("generating", False):
            return
        lengths = prompt_shape(notes)[0]
        for controller in self.candidates:
            if can_rest(controller, lengths, interleaver):
                _install(controller, controller.inner)
                self.resting.append(controller)
        self.candidates.clear()

    def wake(self, module: Any) -> Any:
        """The resting controller of ``module``, put back as its forward; ``None`` if it has none."""
        for index, controller in enumerate(self.resting):
            if controller.module_ref() is module:
                del self.resting[index]
                _install(controller, controller)
                self.candidates.append(controller)
                return controller
        return None


def can_rest(controller: Any, lengths: list[int], interleaver: Any) -> bool:
    """Whether every intervention live on ``controller`` in this run picks only prompt tokens (``lengths``: each row's).

    A position some row lacks keeps the module awake, so that its next pass
    raises the error that names the rows (a switch-on after the prefill).

    Examples:
        >>> from types import SimpleNamespace
        >>> from nnsight_toolbox.optim.positions import normalize_positions
        >>> live = SimpleNamespace(positions=normalize_positions([0, -1]), steps=None, rows=None, live_mediator=lambda i: True)
        >>> controller = SimpleNamespace(noting=None, activations=[live])
        >>> can_rest(controller, [3, 5], None)          # positions 0 and -1 are prompt tokens of both rows
        True
        >>> live.positions = normalize_positions([0, 4])  # row 0 has 3 prompt tokens: position 4 is generated
        >>> can_rest(controller, [3, 5], None)
        False
    """
    if controller.noting is not None:  # the root or an encoder: it notes every pass
        return False
    any_live = False
    for activation in controller.activations:
        if activation.live_mediator(interleaver) is None:
            continue  # a finished run's; it acts on nothing
        spec = activation.positions
        if spec is None or spec.ints is None or spec.ends is not None:  # `PromptPositions`: stay awake, simply
            return False
        start, size = activation.rows if activation.rows is not None else (0, len(lengths))
        for length in lengths[start : start + size]:
            if spec.ints[0] < -length or spec.ints[-1] >= length:  # sorted: a position this row's prompt lacks
                return False
        any_live = True
    return any_live


def _install(controller: Any, forward: Any) -> None:
    """Make ``forward`` the forward of ``controller``'s module (if the module is still alive)."""
    module = controller.module_ref()
    if module is not None:
        module.__dict__["forward"] = forward
