"""`BatchedNNsight`: nnsight's `NNsight` wrapper, able to batch several invokes of tensors.

nnsight's plain ``NNsight(module)`` takes one invoke: its ``_batch`` refuses a
second (``NNsight does not support batching multiple invokes``), because it
cannot know how an arbitrary module's inputs combine. For a model that takes
batch-first tensors (an MLP on ``(rows, features)``, a CNN on images), they
combine by concatenating along dim 0, which is all DAS needs to run a source
and a base as two invokes of one batch.
"""

from __future__ import annotations

from typing import Any

import torch
from nnsight import NNsight

__all__ = ["BatchedNNsight"]


class BatchedNNsight(NNsight):
    """``NNsight`` for a module whose tensor inputs are batch-first: invokes concatenate along dim 0.

    An invoke's rows are dim 0 of its first tensor input; positional tensors
    and keyword tensors are concatenated across invokes, position by position
    and key by key. Other arguments must be equal in every invoke.

    Examples:
        >>> from nnsight_toolbox import BatchedNNsight
        >>> net = BatchedNNsight(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
        >>> with net.trace() as tracer:
        ...     with tracer.invoke(torch.zeros(2, 4)):
        ...         a = net[0].output.save()
        ...     with tracer.invoke(torch.ones(1, 4)):
        ...         b = net[0].output.save()
        >>> a.shape, b.shape
        (torch.Size([2, 3]), torch.Size([1, 3]))
    """

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        """Rows an invoke contributes: dim 0 of its first tensor input (0 without inputs)."""
        for value in (*inputs, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.shape[0] if value.dim() else 1
        return NNsight._batch_size(self, *inputs, **kwargs)

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        """One ``(args, kwargs)`` for ``fn``: each tensor argument concatenated along dim 0 over the invokes."""
        if len(invokes) <= 1:
            return NNsight._batch(self, invokes, fn)
        arities = {len(args) for args, _ in invokes}
        keys = {tuple(sorted(kwargs)) for _, kwargs in invokes}
        if len(arities) > 1 or len(keys) > 1:
            raise ValueError(
                f"`BatchedNNsight` batches invokes that pass the same arguments; got positional counts "
                f"{sorted(arities)} and keyword sets {sorted(keys)}. Give every invoke the same inputs."
            )
        args = tuple(_combine([a[i] for a, _ in invokes], f"argument {i}") for i in range(arities.pop()))
        kwargs = {key: _combine([k[key] for _, k in invokes], f"`{key}=`") for key in keys.pop()}
        return args, kwargs


def _combine(values: list, what: str) -> Any:
    """``values`` concatenated along dim 0 if tensors, else their common value."""
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values, dim=0)
    first = values[0]
    if any(isinstance(v, torch.Tensor) for v in values) or any(v != first for v in values[1:]):
        raise ValueError(
            f"`BatchedNNsight` cannot batch {what} across invokes: it is a tensor in every invoke "
            f"(concatenated along dim 0) or the same value in each; got {[type(v).__name__ for v in values]}."
        )
    return first
