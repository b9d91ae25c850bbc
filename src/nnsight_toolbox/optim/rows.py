"""Which rows of a module's tensors belong to one invoke, or a refusal when that cannot be known.

Several invokes of one trace run as one batch: invoke ``i`` owns rows
``[start, start + size)`` of the ``B`` rows (nnsight's ``Mediator.batch_group``).
A module deep inside the model does not always see those rows along dim 0:

- batch-first ``(B, T, H)`` (most modules): the rows are ``[start, start + size)``;
- flattened batch-major ``(B*T, H)`` (OPT's ``fc1``/``fc2``, Qwen2-MoE's shared
  expert): each row owns ``T`` consecutive entries, ``[start*T, (start + size)*T)``;
- a routed MoE expert ``(n_routed, H)`` holds only the tokens routed to it, and a
  time-first layer ``(T, B, H)`` (FSMT) has its batch on dim 1: neither can be
  narrowed by row, whatever their sizes happen to be.

So rows are scoped only where the layout follows from what the pass is known to
contain: its batch size ``B`` and its sequence lengths. The lengths are noted at
the start of every forward pass from the token inputs of the root module (and
of an encoder-decoder's encoder, which ``generate`` runs on its own before the
first pass); see `note_lengths`. A layout that does not follow is refused by
`row_span` returning ``None``, and the caller raises `layout_error`. The one
ambiguity left is a time-first tensor whose time length equals the batch size:
its shape is that of a batch-first tensor (see the gotchas page).
"""

from __future__ import annotations

from typing import Any

import torch

from .dims import first_tensor
from .positions import PYTHON_MASK_TOKENS

#: Root-module inputs whose dim 1 is a sequence length of the pass.
SEQUENCE_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")

#: The attribute, on nnsight's per-run ``Batcher``, that holds the lengths noted in
#: that run: they live and die with the run, so no note can outlive it.
NOTE = "nnsight_toolbox_lengths"


def note_lengths(batcher: Any, role: str, args: tuple, kwargs: dict, encoder_decoder: bool) -> dict:
    """Record on ``batcher`` the sequence lengths a forward of the root (or the encoder) carries; return the run's notes.

    ``role`` is ``"root"`` or ``"encoder"``; each call replaces that role's note, so
    the root's note is always that of the pass now running (each generation step
    is a new pass with its own lengths: 1 with a KV cache, the whole sequence without).
    """
    # This runs at the start of every forward pass (every generation step), and for a soft
    # prompt it is most of what a step costs: the usual pass first, then the general one
    # with its loops written out and each shape read once.
    total = batcher.total
    notes = batcher.__dict__.get(NOTE)
    if notes is None:
        notes = batcher.__dict__[NOTE] = {}
    ids = kwargs.get("input_ids")
    if not args and not encoder_decoder and type(ids) is torch.Tensor and kwargs.get("inputs_embeds") is None:
        # Token ids by keyword, as `generate` and a tokenized prompt pass them, and no other
        # sequence input (a decoder-only model takes no decoder inputs): the general path
        # below would find this one length alone.
        shape = ids.shape
        if len(shape) == 2 and shape[0] == total:
            width = shape[1]
            notes[role] = frozenset((width,))
            if role == "root":
                _note_pass(notes, total, kwargs, width)
            return notes
    lengths = set()
    for key in SEQUENCE_INPUTS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            _add_length(lengths, value.shape, total)
    first = args[0] if args else None
    if isinstance(first, torch.Tensor):
        if not first.is_floating_point():
            _add_length(lengths, first.shape, total)  # token ids given positionally
        elif first.dim() == 2 and first.shape[0] == total:
            lengths.add(1)  # a (B, features) input: one position per row
    if encoder_decoder:
        # The decoder's passes carry the encoder's length in its mask and outputs.
        for value in (kwargs.get("attention_mask"), first_tensor(kwargs.get("encoder_outputs"))):
            if isinstance(value, torch.Tensor):
                _add_length(lengths, value.shape, total)
    notes[role] = frozenset(lengths)
    if role == "root" and not encoder_decoder:
        note_columns(notes, total, kwargs, first)
    return notes


def _add_length(lengths: set, shape: torch.Size, total: int) -> None:
    """Add dim 1 of a tensor of ``shape`` to ``lengths`` if it is ``(total, length, ...)``."""
    if len(shape) >= 2 and shape[0] == total:
        lengths.add(shape[1])


def note_columns(notes: dict, total: int, kwargs: dict, first: Any) -> None:
    """Note which columns of the whole sequence this pass covers, and at the first pass the prompt's mask.

    For ``positions=`` (see `positions.position_mask`). The attention mask of a
    pass spans every column so far (with a KV cache, the past ones too), and the
    pass's inputs are its last ``t`` columns.
    """
    tokens = kwargs.get("input_ids")
    if not isinstance(tokens, torch.Tensor):
        tokens = kwargs.get("inputs_embeds")
        if not isinstance(tokens, torch.Tensor):
            # Token ids given positionally. A floating-point first input is not tokens:
            # pixels (B, C, H, W) have channels on dim 1, audio features their own
            # layout, so the pass's positions stay unknown and `positions=` is refused.
            tokens = first if isinstance(first, torch.Tensor) and not first.is_floating_point() else None
    if not isinstance(tokens, torch.Tensor):
        return
    shape = tokens.shape
    if len(shape) >= 2 and shape[0] == total:
        _note_pass(notes, total, kwargs, shape[1])


def _note_pass(notes: dict, total: int, kwargs: dict, width: int) -> None:
    """`note_columns` once the pass's ``width`` (its tokens per row) is known."""
    mask = kwargs.get("attention_mask")
    if mask is None and "prompt_mask" in notes:  # a later pass without a mask (as `generate` makes it for an unpadded prompt)
        previous = notes["pass"]
        end = previous[0] + previous[1]  # where the previous pass ended
        notes["pass"] = (0 if width > end - 1 else end, width)
        return
    mask_shape = mask.shape if isinstance(mask, torch.Tensor) else ()
    if len(mask_shape) == 2 and mask_shape[0] == total:
        start = mask_shape[1] - width  # the mask spans every column so far
    else:
        mask = None
        previous = notes.get("pass")
        end = None if previous is None else previous[0] + previous[1]  # where the previous pass ended
        start = 0 if end is None or width > end - 1 else end
    if "prompt_mask" not in notes:
        notes["prompt_mask"] = (mask if mask is not None else torch.ones(total, width, dtype=torch.long)).detach().to("cpu")
        notes["prompt_width"] = notes["prompt_mask"].shape[1]
        notes["generating"] = "logits_to_keep" in kwargs or "use_cache" in kwargs  # what `generate` passes
    notes["pass"] = (start, width)


def prompt_shape(notes: dict) -> tuple[list[int], bool, int]:
    """Each row's real prompt tokens, whether the prompt is left-padded (see `positions.python_mask`), and its width; once per run.

    Examples:
        >>> prompt_shape({"prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])})
        ([2, 3], True, 3)
    """
    shape = notes.get("prompt_shape")
    if shape is None:
        mask = notes["prompt_mask"]
        if mask.numel() <= PYTHON_MASK_TOKENS:  # a small prompt: one conversion, then plain Python
            rows = mask.tolist()
            left_padded = all(value in (0, 1) for row in rows for value in row) and all(row == sorted(row) for row in rows)
            shape = ([int(sum(row)) for row in rows], left_padded, mask.shape[1])
        else:
            mask = mask.to(torch.long)
            left_padded = bool(((mask == 0) | (mask == 1)).all()) and bool((mask[:, 1:] >= mask[:, :-1]).all())
            shape = (mask.sum(1).tolist(), left_padded, mask.shape[1])
        notes["prompt_shape"] = shape
    return shape


def pass_lengths(batcher: Any) -> frozenset:
    """The sequence lengths noted in this run: the running pass's and the encoder's (empty if none)."""
    notes = batcher.__dict__.get(NOTE)
    if not notes:
        return frozenset()
    return notes.get("root", frozenset()) | notes.get("encoder", frozenset())


def row_span(tensor: torch.Tensor, total: int, lengths: frozenset) -> int | None:
    """How many dim-0 entries each batch row owns in ``tensor``, or ``None`` if that is not established.

    1 for batch-first ``(B, T, ...)``; ``T`` for flattened batch-major ``(B*T, ...)``
    where ``T`` is a sequence length of the pass. Token ids (integer tensors) have
    no feature axis, so ``(B, T)`` ids are batch-first and ``(B*T,)`` flattened.

    Examples:
        >>> row_span(torch.zeros(2, 5, 8), total=2, lengths=frozenset({5}))     # batch-first
        1
        >>> row_span(torch.zeros(10, 8), total=2, lengths=frozenset({5}))       # OPT's flattened rows
        5
        >>> row_span(torch.zeros(2, 8), total=2, lengths=frozenset({5})) is None  # 2 routed tokens, not 2 rows
        True
    """
    leading_axes = tensor.dim() - (1 if tensor.is_floating_point() else 0)  # axes before the features
    lead = tensor.shape[0] if tensor.dim() else 0
    if leading_axes >= 2:
        return 1 if lead == total else None
    if leading_axes != 1 or total == 0 or lead % total:
        return None
    per_row = lead // total
    return per_row if per_row in lengths else None


def layout_error(path: str, x: torch.Tensor, output: torch.Tensor, total: int, lengths: frozenset, options: dict) -> ValueError:
    """The refusal for a module whose rows cannot be told apart, naming what was seen and the fix."""
    seen = f"input {tuple(x.shape)} and output {tuple(output.shape)}"
    known = f"sequence length(s) {sorted(lengths)}" if lengths else "no known sequence length"
    changed = [f"`{key}={value}`" for key, value in options.items() if key in ("num_beams", "num_return_sequences") and value not in (None, 1)]
    why = (
        f" The run was given {' and '.join(changed)}, which change the batch size inside the model."
        if changed
        else (
            " This is how a routed MoE expert (which sees only the tokens routed to it), a "
            "time-first layer (T, B, H), or a pooled (B, H) head after a longer sequence look."
        )
    )
    return ValueError(
        f"Cannot scope the adapter on `{path}` to its invoke's rows: the pass has {total} "
        f"rows and {known}, and the module saw {seen}. Rows are scoped only for a "
        f"batch-first (B, T, ...) or a flattened batch-major (B*T, ...) layout.{why} "
        f"Adapt the whole batch instead: switch the adapter on inside an empty "
        f"`tracer.invoke()` (or in a trace with a single invoke)."
    )
