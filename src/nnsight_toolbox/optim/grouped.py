"""Many interventions of one kind on one module, applied as one computation per pass.

A study that compares interventions side by side puts each in its own invoke
of one batch: checkpoints of one adapter, a steering vector at 16 strengths,
one set per hypothesis. On a module, that is K activations of one kind, each
on its own rows. Applied one by one (`activation.add_deltas`' loop), each
would narrow its rows, compute and copy them back, so the cost of a pass would
grow with K. Here they are one computation:

- their parameters are stacked, ``(K, ...)`` (`stacked`: kept for the run,
  rebuilt when a parameter is replaced or changed in place, read from its
  identity, ``_version`` and storage; gradients flow through ``torch.stack`` to each member's own
  parameters);
- each row of the batch is given its member (a gather of the stack; none for
  rows no member acts on, which stay as they are);
- the kind computes every row at once: `LORA` with two ``torch.bmm``, `SteeringVector`
  with one indexed add.

The same path gives one intervention many strengths: ``alpha=`` as a 1-D
sequence, one value per row of the invoke, is a per-row scale of that
computation (`check_row_alphas`), so a sweep of 16 strengths costs about what
one does.

A kind opts in with a private protocol on its own class (a subclass that does
not define it again, `DoRA`, does not inherit it):

- ``_grouped_key(self)``: a hashable key, equal for members whose parameters
  stack and whose options agree (rank, widths, dtype, dropout), or ``None``
  where this one cannot join a group (a parametrized tensor, an embedding);
- ``_grouped_parameters(self)``: the tensors to stack, in order: parameters of
  the adapter's own table (``_parameters``), not tensors computed from them,
  since what it returns is kept between switch-ons while that table holds the
  same tensors (`key_of`);
- ``_grouped_intervene(self, output, x, stacked, member, rows, scale)``: the new
  ``(B, T, d)`` output from the ``(B, T, d)`` output and ``(B, T, in)`` input;
  ``member[m]`` is the stack index of the m-th acted row (``None``: row m is
  member m), ``rows[m]`` its row of the batch (``None``: every row, in order),
  ``scale`` each acted row's (or token's) alpha, ``(M,)`` or ``(M, T)``, zero on
  tokens its ``positions=`` leave out (``None``: 1 everywhere). It must compute
  ``output + delta(x)``, with a delta that does not read ``output``: such
  interventions commute, which is what lets `plan` move a member next to the
  group's first.

What does not opt in (your own kinds, `DoRA`, swaps, soft prompts) goes the
per-activation way, unchanged, and so does a module with one activation on it.
Where the rows of a module's tensors cannot be told apart (time-first, routed
experts) the same refusal applies as for one activation (`check_batch_axis`,
`rows.layout_error`); a layout the group cannot compute on goes one by one.
"""

from __future__ import annotations

import operator
import weakref
from typing import TYPE_CHECKING, Any

import torch

from .rows import NOTE

if TYPE_CHECKING:
    from .activation import Activation, AdapterController

__all__ = ["Group", "plan", "apply", "opts_in", "key_of", "changed", "check_row_alphas"]

#: The key, in the run's notes (`rows.NOTE`), of the group caches: stacks and row indices.
GROUPED = "grouped"


def opts_in(kind: type) -> bool:
    """Whether ``kind`` itself (not a base of it) defines the grouped protocol.

    Examples:
        >>> from nnsight_toolbox import SteeringVector, DoRA
        >>> opts_in(LORA), opts_in(SteeringVector), opts_in(DoRA)
        (True, True, False)
    """
    return "_grouped_intervene" in kind.__dict__


#: Where `key_of` keeps an adapter's key and stacked tensors, in the adapter's ``__dict__``.
MEMO = "_grouped_memo"

#: Bumped whenever an intervention's attributes or parameters are set, deleted,
#: registered or moved (`Optimization.__setattr__`): the tensors an activation
#: took at switch-on (`key_of`) are used at the pass only while it stands still.
CHANGES = [0]


def changed(adapter: Any) -> None:
    """Note that ``adapter``'s attributes or parameters may have changed: drop what `key_of` kept."""
    adapter.__dict__.pop(MEMO, None)
    CHANGES[0] += 1


def key_of(adapter: Any, rows: Any, alpha: Any) -> tuple:
    """``(key, tensors)`` of an activation that may join a group (`plan`), else ``(None, None)``.

    The key is ``(kind, own key, dropout)``; ``None`` for a kind that does not
    opt in, for one activation on the whole batch with one alpha (the
    per-activation path's plain case), and where the kind's `_grouped_key`
    says so. ``tensors`` is ``(CHANGES[0], the kind's _grouped_parameters())``.
    Worked out at switch-on (`Activation.update`), where the adapter is at hand.

    Both are kept on the adapter between switch-ons: reading its parameters
    costs each of K sets more than the rest of its switch-on, once a run has
    pushed them out of the CPU's caches. They are kept while the adapter's
    parameter table holds the same tensors, and dropped when an attribute is
    set or deleted or the adapter is moved (`changed`). A ``param.data = ...``
    of another dtype or device, which neither shows, is caught where the
    group stacks (`Group.stack`). A write into the table itself
    (``adapter._parameters[name] = ...``, which no ``__setattr__`` sees) is
    seen at the next switch-on, not at a pass of the run already switched on.

    Examples:
        >>> key_of(lora, [0, 1], 1.0)[0][0] is LORA, key_of(lora, None, 1.0)
        (True, (None, None))
    """
    kind = type(adapter)
    if "_grouped_intervene" not in kind.__dict__ or (rows is None and type(alpha) is float):
        return None, None
    state = adapter.__dict__
    parameters = tuple(state["_parameters"].values())
    memo = state.get(MEMO)
    if memo is None or len(memo[0]) != len(parameters) or not all(map(operator.is_, memo[0], parameters)):
        own = adapter._grouped_key()
        key = None if own is None else (kind, own, bool(getattr(adapter, "dropout", 0.0)))
        memo = state[MEMO] = (parameters, key, None if key is None else adapter._grouped_parameters())
    # stamped now: they are the adapter's tensors as of this switch-on (see `Group.stack`)
    return memo[1], None if memo[2] is None else (CHANGES[0], memo[2])


def check_row_alphas(alpha: Any, call: str, means: str) -> torch.Tensor:
    """``alpha`` given as one value per row, as a 1-D float64 CPU tensor, or a clear `ValueError`.

    Examples:
        >>> check_row_alphas([0.0, 0.5, 1.0], "lora()", "the scale")
        tensor([0.0000, 0.5000, 1.0000], dtype=torch.float64)
        >>> check_row_alphas([1.0, float("nan")], "lora()", "the scale")
        Traceback (most recent call last):
        ...
        ValueError: `alpha` as one value per row must hold finite numbers (the scale), got a NaN or infinite value at index 1. ...
    """
    try:
        values = torch.as_tensor(alpha.detach() if isinstance(alpha, torch.Tensor) else alpha)
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is None or values.dim() != 1 or values.numel() == 0 or values.dtype == torch.bool or values.is_complex() or not (values.is_floating_point() or values.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        shown = f"a tensor of shape {tuple(alpha.shape)}" if isinstance(alpha, torch.Tensor) else f"{alpha!r:.80}"
        raise ValueError(
            f"`alpha` must be a finite number ({means}) or a 1-D sequence of them, one per row "
            f"of the invoke, got {shown}. Pass e.g. `{call[:-1]}alpha=torch.linspace(0, 2, 16))` "
            f"in an invoke of 16 prompts."
        )
    values = values.to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"`alpha` as one value per row must hold finite numbers ({means}), got a NaN or "
            f"infinite value at index {index}. Give every row a finite alpha; 0 leaves a row as it is."
        )
    return values


class Group:
    """Members of one kind and key, on disjoint rows, applied as one computation; what it needs, kept for the run.

    Made by `plan` and kept with it on the module's controller for the run.
    A group none of whose members has ``positions=`` acts on the same rows
    with the same alphas every pass, so its row index and alphas are worked
    out once; its stack is kept until a parameter changes (`stacked`).
    """

    __slots__ = ("members", "fixed", "pieces", "index", "scale", "tensors", "versions", "stacked")

    def __init__(self, members: list) -> None:
        self.members = members
        self.fixed = False  # set by `plan` once the members are known
        self.pieces = None  # a fixed group's pieces (see `apply`)
        self.index = None  # a fixed group's (member, rows)
        self.scale = None  # a fixed group's scale: False until worked out
        self.tensors = None  # the stacked tensors, and their versions, when stacked
        self.versions = None
        self.stacked = None

    def stack(self, controller: Any) -> tuple | None:
        """The members' `_grouped_parameters`, stacked along a new dim 0; kept until one is replaced or changed in place.

        Kept for the run on the group, and, outside autograd, across runs on the
        module's controller too (the parameters held weakly, the stack a copy
        with no graph): an inference loop over the same sets stacks them once.
        Each use compares every parameter's identity, ``_version`` and storage
        with those it was stacked from, so an optimizer step, an in-place edit
        or a ``param.data = ...`` is seen. ``None`` where the members' tensors
        differ in dtype or device, which their keys did not show (see `key_of`).
        """
        tensors = []
        changes = CHANGES[0]
        for member in self.members:
            seen, taken = member.tensors  # taken at switch-on (`key_of`): the adapter is not read again unless it changed since
            tensors.extend(taken if seen == changes else member._adapter()._grouped_parameters())
        grad = torch.is_grad_enabled()
        old, versions, stacked = self.tensors, self.versions, self.stacked
        if old is None and not grad and controller.stacks is not None:
            refs, versions, stacked = controller.stacks
            old = [ref() for ref in refs]
        if old is not None and versions[0] is grad and len(old) == len(tensors):
            same = True
            for i, tensor in enumerate(tensors):
                # `_version` counts in-place writes; `param.data = ...` keeps it but moves the storage
                if tensor is not old[i] or tensor._version != versions[2 * i + 1] or tensor.data_ptr() != versions[2 * i + 2]:
                    same = False
                    break
            if same:
                self.tensors, self.versions, self.stacked = tensors, versions, stacked
                return stacked
        width = len(tensors) // len(self.members)
        columns = [tensors[j::width] for j in range(width)]
        if any(len({(tensor.dtype, tensor.device) for tensor in column}) > 1 for column in columns):
            # A `param.data = ...` of another dtype or device, which the kept keys do not show:
            # work the keys out again at the next switch-on; this pass goes one by one.
            for member in self.members:
                changed(member._adapter())
            return None
        self.stacked = tuple(torch.stack(column) for column in columns)
        self.tensors = tensors
        versions = [grad]
        for tensor in tensors:
            versions.append(tensor._version)
            versions.append(tensor.data_ptr())
        self.versions = versions
        if not grad:
            controller.stacks = ([weakref.ref(tensor) for tensor in tensors], self.versions, self.stacked)
        return self.stacked


def plan(live: list["Activation"]) -> list:
    """``live`` in application order, with the activations that can be one computation gathered into `Group`s.

    A group holds members of one kind and key (see the module's docstring) on
    disjoint rows. It stands where its first member stood: each later member
    joins it only if no activation of a kind that does not opt in, standing
    between them, acts on that member's rows (those need not commute with
    it); otherwise it starts a new group. A group of one with one alpha is
    given back as the activation itself, which takes the per-activation path.
    """
    steps: list = []
    groups: dict = {}  # key -> [members, starts, whole, barrier starts, barrier whole]
    for activation in live:
        key = activation.group_key if activation.source is None else None
        if key is not None and key[2]:  # with dropout, whether it applies is read now: members must agree
            key = (*key, activation._adapter().training)
        rows = activation.rows
        if key is None:
            steps.append(activation)
            if not opts_in(type(activation._adapter())):  # may not commute with the groups' members: a barrier on its rows
                for entry in groups.values():
                    if rows is None:
                        entry[4] = True
                    else:
                        entry[3].add(rows[0])
            continue
        entry = groups.get(key)
        # Invokes hold disjoint rows, so rows of two invokes overlap only if one is the whole batch.
        if entry is not None and rows is not None and not entry[2] and not entry[4] and rows[0] not in entry[1] and rows[0] not in entry[3]:
            entry[0].members.append(activation)
            entry[1].add(rows[0])
            continue
        group = Group([activation])
        groups[key] = [group, set() if rows is None else {rows[0]}, rows is None, set(), False]
        steps.append(group)
    for index, step in enumerate(steps):
        if type(step) is Group:
            if len(step.members) == 1 and type(step.members[0].alpha) is float:
                steps[index] = step.members[0]
            else:
                step.fixed = all(member.positions is None for member in step.members)
    return steps


def apply(
    group: Group, adapted: torch.Tensor, target: torch.Tensor, x: Any, batcher: Any, controller: "AdapterController", helpers: tuple
) -> torch.Tensor | None:
    """``adapted`` with every member of ``group`` applied on its rows and positions in one computation.

    ``None`` where this pass's layout is one the group does not compute on:
    the caller then applies the members one by one. A member with one alpha
    per row has no such fallback, and is refused with the reason instead.
    ``helpers`` are `activation`'s ``(_chosen_tokens, _row_spans,
    check_batch_axis)``, passed in: importing them here would be a cycle, and
    an import inside a function fails on a remote server (it rebuilds each
    function without its package).
    """
    _chosen_tokens, _row_spans, check_batch_axis = helpers
    members = group.members
    total = batcher.total
    pieces = group.pieces if group.fixed else None
    if pieces is None:
        pieces = _pieces(members, total, target.device, batcher, controller, _chosen_tokens)
        if not pieces:
            return adapted
        if group.fixed:
            group.pieces = pieces
    leader = members[0]._adapter()
    check_batch_axis(leader, target, total, controller.path)
    out_span, in_span = _row_spans(target, x, batcher, controller)
    reads_input = getattr(leader, "reads_input", True)
    masked = not group.fixed and any(piece[3] is not True for piece in pieces)  # some member's positions pick some tokens only
    width = (batcher.__dict__.get(NOTE) or {}).get("pass", (0, None))[1] if masked else None
    why = _unfit(adapted, x, leader, out_span, width, reads_input)
    if why is None:
        stacked = group.stack(controller)
        if stacked is None:
            why = "its members' parameters differ in dtype or device"
    if why is not None:
        if any(type(alpha) is not float for *_, alpha in pieces):
            raise ValueError(
                f"`{members[0].what}` with one alpha per row cannot act on `{controller.path}`: {why}. "
                f"Put it on a module whose output is (rows, tokens, width), or pass one alpha."
            )
        return None
    for piece in pieces:
        members[piece[0]].acted = True
    d = adapted.shape[-1]
    out3 = adapted.reshape(total, -1, d) if out_span == 1 else adapted.reshape(total, out_span, d)
    x3 = x.reshape(total, out3.shape[1], x.shape[-1]) if reads_input else None
    if group.fixed and group.index is not None:
        (member, rows), scale = group.index, group.scale
    else:
        notes = batcher.__dict__.get(NOTE)
        if notes is None:
            notes = batcher.__dict__[NOTE] = {}
        cache = notes.get(GROUPED)
        if cache is None:
            cache = notes[GROUPED] = {}
        member, rows = _row_index(pieces, len(members), total, target.device, cache)
        scale = _scale(pieces, stacked[0].dtype, target.device, out3.shape[1], cache)
        if group.fixed:
            group.index, group.scale = (member, rows), scale
    changed = leader._grouped_intervene(out3, x3, stacked, member, rows, scale)
    return changed.reshape(adapted.shape)


def _pieces(members: list, total: int, device: torch.device, batcher: Any, controller: Any, _chosen_tokens: Any) -> list:
    """``(index in the group, start, size, chosen, alpha)`` of each member that acts on some token of this pass."""
    pieces = []
    for index, activation in enumerate(members):
        start, size = activation.rows if activation.rows is not None else (0, total)
        spec = activation.positions
        chosen = True if spec is None else _chosen_tokens(spec, start, size, device, batcher, controller)
        if chosen is False:
            continue  # none of this pass's tokens
        alpha = activation.alpha
        if type(alpha) is not float and alpha.shape[0] != size:
            raise ValueError(
                f"`{activation.what}` on `{controller.path}` was given {alpha.shape[0]} alphas, one per "
                f"row, but its invoke has {size} row(s) in this run. Give one alpha per prompt of the "
                f"invoke, or one number for all of them."
            )
        pieces.append((index, start, size, chosen, alpha))
    return pieces


def _unfit(adapted: torch.Tensor, x: Any, leader: Any, out_span: int, width: int | None, reads_input: bool) -> str | None:
    """Why the group cannot compute on this pass's tensors, or ``None`` if it can."""
    if adapted.dim() < 2:
        return f"its output {tuple(adapted.shape)} has no feature axis"
    if adapted.shape[-1] != leader.output_dim:
        return f"its output {tuple(adapted.shape)} is not {leader.output_dim} wide, as the intervention was built for"
    if width is not None and not ((out_span == 1 and adapted.dim() == 3 and adapted.shape[1] == width) or out_span == width):
        return f"its output {tuple(adapted.shape)} has no token axis of this pass's {width} tokens to choose `positions=` from"
    if out_span == 1 and adapted.dim() > 3:
        return f"its output {tuple(adapted.shape)} has more than one axis between the rows and the features"
    if reads_input:
        if not isinstance(x, torch.Tensor) or x.shape[:-1] != adapted.shape[:-1]:
            return f"its first input {tuple(getattr(x, 'shape', ()))} is not laid out as its output {tuple(adapted.shape)}"
        if x.shape[-1] != getattr(leader, "input_dim", x.shape[-1]):
            return f"its first input {tuple(x.shape)} is not {leader.input_dim} wide, as the intervention was built for"
    return None


def _row_index(pieces: list, count: int, total: int, device: torch.device, cache: dict) -> tuple:
    """Each acted row's member and its row of the batch, as ``(member, rows)``; ``None`` for the identity (cached per layout)."""
    key = ("rows", device, count, total, *((index, start, size) for index, start, size, _, _ in pieces))
    found = cache.get(key)
    if found is not None:
        return found
    member_list, row_list = [], []
    for index, start, size, _, _ in pieces:
        member_list.extend([index] * size)
        row_list.extend(range(start, start + size))
    identity_rows = row_list == list(range(total))
    identity_members = len(member_list) == count and member_list == list(range(count))
    member = None if identity_members else torch.tensor(member_list, device=device)
    rows = None if identity_rows else torch.tensor(row_list, device=device)
    cache[key] = (member, rows)
    return member, rows


def _scale(pieces: list, dtype: torch.dtype, device: torch.device, width: int, cache: dict) -> torch.Tensor | None:
    """Each acted row's alpha, ``(M,)``, or each token's, ``(M, T)`` with 0 where ``positions=`` leaves it out; ``None``: all 1."""
    masked = any(chosen is not True for _, _, _, chosen, _ in pieces)
    scalars = all(type(alpha) is float for *_, alpha in pieces)
    if not masked and scalars:
        alphas = tuple(alpha for *_, alpha in pieces)
        if all(alpha == 1.0 for alpha in alphas):
            return None
        key = ("alpha", dtype, device, *((size, alpha) for _, _, size, _, alpha in pieces))
        found = cache.get(key)
        if found is None:
            values = []
            for _, _, size, _, alpha in pieces:
                values.extend([alpha] * size)
            found = cache[key] = torch.tensor(values, dtype=dtype, device=device)
        return found
    parts = []
    for _, _, size, chosen, alpha in pieces:
        row = torch.full((size,), alpha, dtype=dtype, device=device) if type(alpha) is float else alpha.to(device=device, dtype=dtype)
        if masked:
            mask = torch.ones(size, width, dtype=dtype, device=device) if chosen is True else chosen.reshape(size, width).to(dtype)
            row = row[:, None] * mask
        parts.append(row)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
