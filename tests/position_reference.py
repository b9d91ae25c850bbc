"""An independent reference for ``positions=``: a plain torch forward hook that applies a formula
only at the columns this module computes from the tokenizer's attention mask.

It shares no code with the package. A row's real tokens are its columns where
the (left-padded) attention mask is 1, numbered 0, 1, ...; in generation each
new column continues the row's count. Which positions a ``positions=`` value
picks is read with Python's own slicing of ``range(L)`` over a prompt of ``L``
tokens; past the prompt, a slice continues in its steps and an int picks the
generated token it counts to.
"""

from __future__ import annotations

import contextlib

import torch

EVERY = object()  # a row adapted at every token (``positions=None``)


def picks(spec, position: int, length: int) -> bool:
    """Whether ``positions=spec`` picks ``position`` of a row with a prompt of ``length`` tokens."""
    if spec is EVERY:
        return True
    if isinstance(spec, slice):
        if position < length:
            return position in list(range(length))[spec]
        # generated: a slice continues past the prompt, from its start, in its steps, up to its stop
        if spec.stop is not None and position >= (spec.stop if spec.stop >= 0 else length + spec.stop):
            return False
        start = 0 if spec.start is None else spec.start if spec.start >= 0 else max(length + spec.start, 0)
        return position >= start and (position - start) % (spec.step or 1) == 0
    chosen = [spec] if isinstance(spec, int) else list(spec)
    return position in {p if p >= 0 else length + p for p in chosen}


def column_mask(attention_mask: torch.Tensor, specs: list, first_column: int, width: int) -> torch.Tensor:
    """``(B, width)``: which of columns ``[first_column, first_column + width)`` each row's spec picks.

    ``specs[b]`` is row b's ``positions=`` (`EVERY` for all, ``None`` for a row not adapted).
    """
    rows, prompt_width = attention_mask.shape
    lengths = attention_mask.sum(1).tolist()
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for b in range(rows):
        if specs[b] is None:
            continue
        for j in range(width):
            column = first_column + j
            if column < prompt_width:
                if not attention_mask[b, column]:
                    continue  # padding is never a position
                position = column - (prompt_width - lengths[b])  # left padding
            else:
                position = lengths[b] + column - prompt_width
            mask[b, j] = picks(specs[b], position, lengths[b])
    return mask


@contextlib.contextmanager
def positioned_hook(module: torch.nn.Module, formula, attention_mask: torch.Tensor, specs: list):
    """Hook ``module``: ``formula(h, x)`` replaces its output (first element) at the picked columns.

    Columns are counted across calls (a prefill, then one per decode step), so
    the same hook serves a forward and ``generate`` with a KV cache.
    """
    seen = {"columns": 0}

    def hook(mod, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        h = output[0] if isinstance(output, tuple) else output
        mask = column_mask(attention_mask, specs, seen["columns"], h.shape[1])
        seen["columns"] += h.shape[1]
        new = torch.where(mask[..., None], formula(h, x).to(h.dtype), h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def left_padded(model, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The batch as nnsight builds it: left padding."""
    tokenizer = model.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(tokenizer(prompts, return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = side


def raw_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The raw HF forward with the position ids nnsight supplies for a left-padded batch."""
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model._module(**batch, position_ids=position_ids).logits


def raw_generate(model, batch: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    return model._module.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
