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
    `model` here is a GPT-2 that an NDIF server serves, loaded with ``TransformersModel(..., task="text-generation")``,
    and `lora` is `LORA(model.transformer.h[0].mlp, r=8)`.

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
        `model` here is a GPT-2 that an NDIF server serves, loaded with ``TransformersModel(..., task="text-generation")``,
        and `lora` is `LORA(model.transformer.h[0].mlp, r=8)`.

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
    """Fail before sending if the server could not rebuild ``obj``, or would apply it to another module.

    Called when an intervention is pickled. Only a pickling by nnsight's remote
    serializer is checked, for two things:

    - the class must travel by value (its package registered with
      ``nnsight.register``), since NDIF servers do not install this package, or
      a user's package that subclasses it, and would otherwise answer with a
      bare ``ModuleNotFoundError``;
    - the intervention's module must belong to the model the request runs on.
      The server finds the module by its path in its own model; a path that
      model lacks comes back as "the model architecture on this server doesn't
      match", which blames package versions. An intervention built on another
      model passes only if the traced model has, at the same path, a module of
      the same class with parameters of the same shapes.

    Raises:
        RuntimeError: One line naming the ``nnsight.register(...)`` call to make.
        ValueError: If the intervention's module is not one of the traced model's,
            naming the path and what the traced model has there.

    Examples:
        `lora` here is `LORA(model.transformer.h[0].mlp, r=8)`, on `model = load_tiny_model()`,
        a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> check_shippable(lora)   # passes: importing nnsight_toolbox registered it
    """
    cls = type(obj)
    if _pickled_by_reference(cls) and _pickled_for_nnsight_server():  # the cheap test first
        package = cls.__module__.split(".", 1)[0]
        raise RuntimeError(
            f"`{cls.__name__}` cannot be sent to a remote nnsight server: its package `{package}` is not "
            f"registered, so the server, which does not install it, could not rebuild it. Call "
            f"`nnsight.register({package})` (after `import {package}`) before the remote block."
        )
    _check_module_belongs_to_traced_model(obj)


def _check_module_belongs_to_traced_model(obj: Any) -> None:
    """Raise if ``obj``'s module would not resolve to the same module in the request's model (`check_shippable`)."""
    from nnsight.intervention.envoy import Envoy

    envoy = getattr(obj, "module", None)
    if not isinstance(envoy, Envoy):  # a set: its members are checked as they are pickled
        return
    traced = _traced_model()
    if traced is None or envoy.root is traced:
        return
    kind, path = type(obj).__name__, envoy.path
    found = next((candidate for candidate in traced.modules() if candidate.path == path), None)
    if found is None:
        there = (
            f"has no module at `{path}`. The server looks the module up by that path in its own model, "
            f"and would answer that its model architecture does not match, blaming package versions"
        )
    elif type(found._module).__name__ != type(envoy._module).__name__:
        there = f"has a `{type(found._module).__name__}` at `{path}`, not the `{type(envoy._module).__name__}` it was built on"
    elif (shapes := _shape_difference(envoy._module, found._module)) is not None:
        name, ours, theirs = shapes
        there = f"has a module at `{path}` whose `{name}` is {theirs}, not {ours} as on the model it was built on"
    else:
        return  # the same module, as far as the server can tell: the intervention applies to it
    raise ValueError(
        f"This `{kind}` acts on `{path}` of another model than the one this remote request runs on, "
        f"and the traced model {there}. Build the `{kind}` on a module of the model you trace, or "
        f"load its saved weights onto one (`{kind}.load(directory, module)`)."
    )


def _shape_difference(ours: torch.nn.Module, theirs: torch.nn.Module) -> tuple[str, tuple, tuple] | None:
    """The first parameter or buffer whose shape differs between two modules of one class, or ``None``."""
    mine = {name: tuple(t.shape) for name, t in [*ours.named_parameters(), *ours.named_buffers()]}
    other = {name: tuple(t.shape) for name, t in [*theirs.named_parameters(), *theirs.named_buffers()]}
    for name in sorted(mine.keys() | other.keys()):
        if mine.get(name) != other.get(name):
            return name, mine.get(name), other.get(name)
    return None


def _traced_model() -> Any:
    """The model (its root Envoy) of the remote request being serialized now, or ``None``.

    nnsight's ``RequestModel.serialize(tracer)`` pickles the block: a trace's
    tracer holds its model; a session's block is matched by the models its
    source references, when they are exactly one.
    """
    from nnsight.intervention.envoy import Envoy
    from nnsight.schema.request import RequestModel

    serialize = getattr(RequestModel.serialize, "__func__", RequestModel.serialize).__code__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not serialize:
        frame = frame.f_back
    if frame is None:
        return None
    envoy = getattr(frame.f_locals.get("tracer"), "envoy", None)
    if isinstance(envoy, Envoy):
        return envoy.root
    block = frame.f_locals.get("interventions")  # (source, globals, locals) the block references
    if not (isinstance(block, tuple) and len(block) == 3 and all(isinstance(scope, dict) for scope in block[1:])):
        return None
    roots = {id(value.root): value.root for scope in block[1:] for value in scope.values() if isinstance(value, Envoy)}
    return next(iter(roots.values())) if len(roots) == 1 else None


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
