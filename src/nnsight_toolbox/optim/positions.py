"""``positions=``: which tokens of each row an intervention acts on.

Positions count **each row's real tokens**, never padding:

- ``0`` is a row's first prompt token; ``-1`` its last prompt token (negative
  positions count back from the end of the prompt);
- in ``model.generate(...)``, generated tokens continue the count: a row with a
  prompt of ``L`` tokens has its first new token at position ``L``;
- a ``slice`` is read over that unbounded count, its negative bounds from the end
  of the prompt: ``slice(-1, None)`` is the last prompt token and every generated
  token; ``slice(0, -1)`` every prompt token but the last.

So ``positions=[0, 1, -2, -1]`` touches the first two and last two prompt tokens
of every row (pyreft's "f2+l2"), whatever the rows' lengths and padding.

In a teacher-forced trace the input is the prompt *and* its answer, so ``-1``
there is the answer's last token, not the prompt's. `PromptPositions` says
where each row's prompt ends, so the same positions pick the same tokens in
training and in ``generate``: ``PromptPositions(-1, prompt_lengths=[10, 7])``.

How a position becomes a column of the running pass. The prompt's attention
mask (noted at the first pass, see `rows.note_lengths`) says which of the ``T``
padded columns are a row's real tokens; generated tokens are appended after
column ``T - 1`` for every row. Each pass covers columns ``[start, start + t)``
of that sequence: the whole prompt at the prefill, one column per decode step
with a KV cache. `position_mask` maps the chosen positions of each row to a
``(rows, t)`` boolean mask over the pass's columns; the intervention's result is
kept where it is true and the module's own output elsewhere.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch

class PromptPositions:
    """Positions counted over a prompt whose length you give per row: the same tokens in a teacher-forced trace and in ``generate``.

    In training, the trace runs the prompt and its answer together, so
    ``positions=-1`` would be the answer's last token. Give each row's prompt
    length and the positions count over that prompt instead: negative positions
    and negative slice bounds count back from the prompt's end, and the tokens
    after it continue the count, as generated tokens do in ``generate``. Every
    form of ``positions=`` is accepted (an int, a list of ints, a slice).

    Args:
        positions: The positions, as for ``positions=``.
        prompt_lengths: Each row's prompt length in real tokens, one per row of
            the invoke, or one int for every row. In ``generate`` the prompt is
            the whole input, so a row's length is its real prompt tokens, and
            ``PromptPositions(-1, prompt_lengths=lengths)`` picks what ``-1`` does.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import SteeringVector
        >>> steer = SteeringVector(model.transformer.h[0])
        >>> prompt, answer = "The capital of France is", " Paris"
        >>> with model.trace(prompt + answer):                  # training: the last prompt token
        ...     steer(positions=PromptPositions(-1, prompt_lengths=len(prompt)))
        >>> with model.generate(prompt, max_new_tokens=2):      # the same token
        ...     steer(positions=-1)
    """

    __slots__ = ("positions", "prompt_lengths")

    def __init__(self, positions: Any, prompt_lengths: "int | list[int] | tuple[int, ...]") -> None:
        if isinstance(positions, PromptPositions):
            raise TypeError("`PromptPositions` takes the positions themselves (an int, a list of ints or a slice), not another `PromptPositions`.")
        normalize_positions(positions)  # the same checks as `positions=`
        if isinstance(prompt_lengths, torch.Tensor):
            prompt_lengths = prompt_lengths.tolist()
        lengths = (prompt_lengths,) if isinstance(prompt_lengths, int) and not isinstance(prompt_lengths, bool) else prompt_lengths
        try:
            lengths = tuple(lengths)
        except TypeError:
            lengths = ()
        if not lengths or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths):
            raise ValueError(
                f"`prompt_lengths` must be a positive int or a list of them, one per row of the "
                f"invoke (each row's prompt length in real tokens), got {prompt_lengths!r}."
            )
        self.positions, self.prompt_lengths = positions, lengths

    def __repr__(self) -> str:
        lengths = self.prompt_lengths[0] if len(self.prompt_lengths) == 1 else list(self.prompt_lengths)
        return f"PromptPositions({self.positions!r}, prompt_lengths={lengths!r})"


#: What ``positions=`` accepts.
Positions = Union[None, int, slice, "list[int]", "tuple[int, ...]", range, PromptPositions]


class PositionSpec:
    """A normalized ``positions=`` value: a set of ints (negatives from the prompt's end) or a slice.

    A plain class, not a dataclass: the package ships to remote servers as source.
    """

    __slots__ = ("ints", "int_set", "start", "stop", "step", "text", "ends")

    def __init__(self, ints: "tuple[int, ...] | None", start: int | None, stop: int | None, step: int, text: str, ends: "tuple[int, ...] | None" = None) -> None:
        self.ints, self.start, self.stop, self.step, self.text = ints, start, stop, step, text
        self.int_set = None if ints is None else frozenset(ints)  # for membership tests, made once
        self.ends = ends  # `PromptPositions`' prompt lengths, one per row (or one for all); None: each row's real prompt

    def prompt_ends(self, lengths: "list[int]", path: str) -> "list[int]":
        """Where each row's prompt ends, for negative positions: ``lengths`` (the rows' real prompt tokens), or `PromptPositions`' lengths.

        Examples:
            >>> normalize_positions(-1).prompt_ends([10, 7], "m")
            [10, 7]
            >>> normalize_positions(PromptPositions(-1, prompt_lengths=[4, 3])).prompt_ends([10, 7], "m")
            [4, 3]
        """
        if self.ends is None:
            return list(lengths)
        ends = list(self.ends) * len(lengths) if len(self.ends) == 1 else list(self.ends)
        if len(ends) != len(lengths):
            raise ValueError(
                f"`positions={self.text}` on `{path}`: it gives {len(self.ends)} prompt lengths, and its "
                f"invoke has {len(lengths)} rows. Give one per row, in the invoke's order, or one int for every row."
            )
        longer = [row for row, (end, length) in enumerate(zip(ends, lengths)) if end > length]
        if longer:
            raise ValueError(
                f"`positions={self.text}` on `{path}`: row(s) {longer} have {[lengths[r] for r in longer]} "
                f"real tokens in their input, fewer than the prompt lengths given "
                f"({[ends[r] for r in longer]}). A prompt length counts the row's real prompt tokens, "
                f"which the input holds (with the answer after them, in training)."
            )
        return ends


def normalize_positions(positions: Any) -> PositionSpec | None:
    """``None``, or the `PositionSpec` of ``positions``, or a `ValueError` saying what is accepted.

    Examples:
        >>> normalize_positions(None) is None
        True
        >>> normalize_positions([0, -1]).ints
        (-1, 0)
        >>> normalize_positions(slice(-1, None)).start
        -1
    """
    if positions is None:
        return None
    if isinstance(positions, PositionSpec):
        return positions
    if isinstance(positions, PromptPositions):
        spec = normalize_positions(positions.positions)
        return PositionSpec(spec.ints, spec.start, spec.stop, spec.step, repr(positions), positions.prompt_lengths)
    text = repr(positions)
    if isinstance(positions, slice):
        parts = (positions.start, positions.stop, positions.step)
        if not all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in parts) or (positions.step is not None and positions.step < 1):
            raise ValueError(
                f"`positions={text}`: a slice of positions needs int (or None) bounds and a "
                f"positive step, such as `slice(-1, None)` (the last prompt token and every "
                f"generated one)."
            )
        return PositionSpec(None, positions.start, positions.stop, positions.step or 1, text)
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = (positions,)
    try:
        chosen = tuple(sorted(set(positions)))
    except TypeError:
        chosen = None
    if not chosen or not all(isinstance(p, int) and not isinstance(p, bool) for p in chosen):
        raise ValueError(
            f"`positions` must be None (every token), an int, a list of ints or a slice, "
            f"counted over each row's real tokens (0 is the first prompt token, -1 the last); "
            f"got {text}."
        )
    return PositionSpec(chosen, None, None, 1, text)


def prompt_positions(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Each prompt column's position among its row's real tokens, -1 on padding: ``(rows, T)``."""
    mask = prompt_mask.to(torch.long)
    return torch.where(mask.bool(), mask.cumsum(1) - 1, torch.full_like(mask, -1))


def column_positions(prompt_mask: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """``(rows, width)``: each column of the pass's position among its row's real tokens, -1 on padding.

    Columns ``[start, start + width)`` of the whole sequence; generated columns
    (from the prompt's width on) continue each row's count.

    Examples:
        >>> column_positions(torch.tensor([[0, 1, 1], [1, 1, 1]]), 0, 3).tolist()
        [[-1, 0, 1], [0, 1, 2]]
        >>> column_positions(torch.tensor([[0, 1, 1], [1, 1, 1]]), 3, 1).tolist()   # first generated token
        [[2], [3]]
    """
    prompt_width = prompt_mask.shape[1]
    lengths = prompt_mask.to(torch.long).sum(1)  # (rows,) real prompt tokens
    columns = torch.arange(start, start + width)  # absolute columns of this pass
    in_prompt = columns < prompt_width
    by_prompt = prompt_positions(prompt_mask)[:, columns.clamp(max=prompt_width - 1)]  # (rows, width)
    generated = lengths[:, None] + (columns - prompt_width)[None, :]
    return torch.where(in_prompt[None, :], by_prompt, generated)


def position_mask(
    spec: PositionSpec, prompt_mask: torch.Tensor, start: int, width: int, generating: bool, path: str, position: torch.Tensor | None = None
) -> torch.Tensor:
    """``(rows, width)`` booleans: which columns ``[start, start + width)`` of the pass ``spec`` picks, per row.

    ``prompt_mask`` is the prompt's attention mask for these rows, ``(rows, T)``;
    ``position`` is `column_positions` of the same columns, if the caller has it.
    A position some row does not have raises a `ValueError` that names the rows.

    Examples:
        >>> mask = torch.tensor([[0, 1, 1], [1, 1, 1]])          # row 0 is left-padded: 2 real tokens
        >>> position_mask(normalize_positions(-1), mask, 0, 3, False, "m").tolist()
        [[False, False, True], [False, False, True]]
        >>> position_mask(normalize_positions(0), mask, 0, 3, False, "m").tolist()
        [[False, True, False], [True, False, False]]
    """
    lengths = prompt_mask.to(torch.long).sum(1)  # (rows,) real prompt tokens
    ends = lengths if spec.ends is None else torch.tensor(spec.prompt_ends(lengths.tolist(), path))  # where negatives count from
    if position is None:
        position = column_positions(prompt_mask, start, width)  # -1 on padding
    real = position >= 0
    if spec.ints is not None:
        wanted = torch.tensor(spec.ints)[None, :] + torch.where(torch.tensor(spec.ints) < 0, ends[:, None], 0)  # (rows, k)
        _check_ints(spec, wanted, lengths, generating, path)
        picked = (position[:, :, None] == wanted[:, None, :]).any(-1)
    else:
        low = _bound(spec.start, ends, 0)
        high = _bound(spec.stop, ends, math.inf)
        picked = (position >= low[:, None]) & (position.double() < high[:, None]) & ((position - low[:, None]) % spec.step == 0)
    return picked & real


#: The most tokens (rows x columns) a pass may have for `python_mask` to choose them:
#: past that, a few tensor operations cost less than a Python loop over every token.
PYTHON_MASK_TOKENS = 4096


def python_mask(
    spec: PositionSpec, lengths: list[int], prompt_width: int, start: int, width: int, generating: bool, left_padded: bool
) -> list[list[bool]] | None:
    """`position_mask` in plain Python, where a row's positions follow from its length alone.

    A row's position at column ``c`` is ``c - (prompt_width - length)``: for
    generated columns always (they continue the count), and for prompt columns
    when the prompt is left-padded (each row's real tokens are its last
    ``length`` columns, as nnsight pads). So a generation step, or the prefill
    of a small left-padded batch, needs a few comparisons per token instead of a
    dozen small tensor operations. ``lengths`` holds each row's real prompt
    tokens. Returns ``None`` where `position_mask` must decide: prompt columns
    of a prompt that is not left-padded, or a position some row lacks (it
    raises the error that names the rows).

    Examples:
        >>> python_mask(normalize_positions(slice(-1, None)), [2, 3], 3, 3, 1, True, True)   # a generation step
        [[True], [True]]
        >>> python_mask(normalize_positions(0), [2, 3], 3, 0, 3, False, True)                # the prefill: row 0 is padded
        [[False, True, False], [True, False, False]]
    """
    if start < prompt_width and not left_padded:
        return None
    if spec.ends is not None:
        return None  # `PromptPositions`: `position_mask` checks the prompt lengths given
    rows = []
    ints = spec.ints  # sorted
    same_for_every_row = ints is not None and ints[0] >= 0  # no position counted from the end
    if same_for_every_row:
        wanted, low, high = spec.int_set, ints[0], ints[-1]
    for length in lengths:
        first = start - (prompt_width - length)  # the position of column `start` in this row; negative on padding
        if ints is not None:
            if not same_for_every_row:
                wanted = {p + length if p < 0 else p for p in ints}
                low, high = min(wanted), max(wanted)
            if low < 0 or (not generating and high >= length):
                return None
            if first > high or first + width <= low:  # none of them in this pass (a soft prompt's generation steps)
                rows.append([False] * width)
            else:
                rows.append([first + i in wanted for i in range(width)])
        else:
            low = 0 if spec.start is None else max(length + spec.start if spec.start < 0 else spec.start, 0)
            high = math.inf if spec.stop is None else max(length + spec.stop if spec.stop < 0 else spec.stop, 0)
            rows.append([low <= p < high and (p - low) % spec.step == 0 for p in range(first, first + width)])
    return rows


def python_columns(lengths: list[int], prompt_width: int, start: int, width: int) -> list[list[int]]:
    """`column_positions` in plain Python, for the passes `python_mask` serves: -1 on padding.

    Examples:
        >>> python_columns([2, 3], 3, 0, 4)
        [[-1, 0, 1, 2], [0, 1, 2, 3]]
    """
    return [[max(c - (prompt_width - length), -1) for c in range(start, start + width)] for length in lengths]


def _bound(value: int | None, lengths: torch.Tensor, default: float) -> torch.Tensor:
    """A slice bound per row: negatives count back from the end of the prompt, clamped at 0."""
    if value is None:
        return torch.full(lengths.shape, default, dtype=torch.double if math.isinf(default) else torch.long)
    bound = lengths + value if value < 0 else torch.full_like(lengths, value)
    return bound.clamp(min=0)


def _check_ints(spec: PositionSpec, wanted: torch.Tensor, lengths: torch.Tensor, generating: bool, path: str) -> None:
    """A position before a row's first token, or (outside generation) after its last, is an error."""
    missing = (wanted < 0) | (~torch.tensor(generating) & (wanted >= lengths[:, None]))
    if bool(missing.any()):
        bad_rows = [int(r) for r in missing.any(1).nonzero().flatten()]
        raise ValueError(
            f"`positions={spec.text}` on `{path}`: row(s) {bad_rows} of this invoke have no such "
            f"position (their prompts have {[int(lengths[r]) for r in bad_rows]} real tokens; "
            f"positions count each row's real tokens, 0 the first and -1 the last). Choose "
            f"positions every row has, or put the shorter prompts in another invoke."
        )
