"""Using adapters on models served by NDIF (``remote=True``).

A remote trace ships its code and the objects it references to the server, and
runs there against the server's copy of the model. For an adapter this means:

- the package travels with the request: importing `nnsight_toolbox` registers it
  (``nnsight.register``), because NDIF servers do not install it;
- the adapter's parameters are server-side copies: training inside
  ``model.session(remote=True)`` changes those copies, and the trained tensors
  come home only if the session saves them (`save_weights`), to be loaded with
  ``lora.load_state_dict(...)``.

Examples:
    >>> from nnsight_toolbox.remote import save_weights
    >>> with model.session(remote=True):
    ...     optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    ...     for step in range(10):
    ...         with model.trace(prompt):
    ...             lora()
    ...             logits = model.lm_head.output[:, -1].save()
    ...         loss = torch.nn.functional.cross_entropy(logits, target)
    ...         optimizer.zero_grad()
    ...         loss.backward()
    ...         optimizer.step()
    ...     weights = save_weights(lora)
    >>> lora.load_state_dict(weights)
"""

from __future__ import annotations

import sys
from typing import Any

import nnsight
import torch

__all__ = ["save_weights", "check_shippable"]


def save_weights(adapter: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Mark a snapshot of ``adapter``'s weights to come back from the running session or trace.

    On a remote server the adapter's parameters are copies, so training there
    leaves the client's adapter as it was. Call this at the end of
    ``model.session(remote=True)`` and load what it returns with
    ``adapter.load_state_dict(...)`` after the block. Works the same locally.

    Args:
        adapter: A `LORA` (or any `torch.nn.Module`).

    Returns:
        ``{name: tensor}`` as in ``adapter.state_dict()``: detached copies, saved with ``nnsight.save``.

    Raises:
        RuntimeError: If called outside ``model.session(...)`` or ``model.trace(...)``.

    Examples:
        >>> with model.session(remote=True):
        ...     ...                       # a training loop
        ...     weights = save_weights(lora)
        >>> lora.load_state_dict(weights)
    """
    snapshot = {name: tensor.detach().clone() for name, tensor in adapter.state_dict().items()}
    try:
        return nnsight.save(snapshot)
    except ValueError:
        raise RuntimeError(
            "`save_weights(...)` must be called inside `model.session(...)` or "
            "`model.trace(...)`: it marks the weights to bring back from that block. "
            "Outside one, the adapter's own weights are already here: use `adapter.state_dict()`."
        ) from None


def check_shippable(obj: Any) -> None:
    """Fail before sending if the server could not rebuild ``obj``'s class.

    Called when an adapter is pickled. Only a pickling by nnsight's remote
    serializer is checked: the class must travel by value (its package
    registered with ``nnsight.register``), since NDIF servers do not install
    this package, or a user's package that subclasses it, and would otherwise
    answer with a bare ``ModuleNotFoundError``.

    Raises:
        RuntimeError: One line naming the ``nnsight.register(...)`` call to make.

    Examples:
        >>> check_shippable(lora)   # passes: importing nnsight_toolbox registered it
    """
    cls = type(obj)
    if not _pickled_by_reference(cls) or not _pickled_for_nnsight_server():  # the cheap test first
        return
    package = cls.__module__.split(".", 1)[0]
    raise RuntimeError(
        f"`{cls.__name__}` cannot be sent to a remote nnsight server: its package `{package}` is not "
        f"registered, so the server, which does not install it, could not rebuild it. Call "
        f"`nnsight.register({package})` (after `import {package}`) before the remote block."
    )


def _pickled_by_reference(cls: type) -> bool:
    """Whether cloudpickle would send ``cls`` as an import path rather than its source."""
    try:
        from cloudpickle.cloudpickle import _should_pickle_by_reference
    except ImportError:  # another cloudpickle layout: cannot tell, so do not block
        return False
    return bool(_should_pickle_by_reference(cls))


def _pickled_for_nnsight_server() -> bool:
    """Whether nnsight's remote serializer is the pickler running now."""
    from nnsight.intervention.serialization import CustomCloudPickler

    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), CustomCloudPickler):
            return True
        frame = frame.f_back
    return False
