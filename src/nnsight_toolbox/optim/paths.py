"""Finding the nnsight Envoy of a module from its path, for every path ``named_modules()`` lists.

``model.get("bert.encoder.layer.0.output.dense")`` walks attributes, and nnsight
0.8 exposes a submodule literally named ``output`` (every BERT-style layer has
one) as ``E_output``, because ``.output`` is the value nnsight serves on every
module. So attribute walking fails on such paths, outside a trace with
"Cannot access ... outside of interleaving". Every path-based entry point of
this package (`LoraSet.on`, `LoraSet.load`, `import_peft`) resolves paths here
instead, through nnsight's own record of each module's children by their real
names (``Envoy._child_map``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["envoy_at"]


def envoy_at(root: Envoy, path: str) -> Envoy:
    """The Envoy of the module at ``path`` under ``root``, as ``root._module.named_modules()`` names it.

    ``path`` may also start with ``root``'s own nnsight path (``"model."``).

    Examples:
        >>> envoy_at(model, "transformer.h.0.mlp").path
        'model.transformer.h.0.mlp'
        >>> envoy_at(model, "model.transformer.h.0.mlp").path      # nnsight's spelling works too
        'model.transformer.h.0.mlp'
    """
    prefix = f"{root.path}."
    found = _walk(root, path)
    if isinstance(found, str) and path.startswith(prefix):  # nnsight's spelling, with the root's name in front
        found = _walk(root, path[len(prefix):])
    if isinstance(found, str):
        raise ValueError(
            f"`{root.path}` has no module at `{path}`: {found}. Paths are those "
            f"`model._module.named_modules()` lists, such as `transformer.h.0.mlp`."
        )
    return found


def _walk(root: Envoy, path: str) -> Envoy | str:
    """The Envoy at ``path`` through each module's children by their real names, or why not."""
    envoy = root
    parts = path.split(".")
    for depth, part in enumerate(parts):
        children = getattr(envoy, "_child_map", {})
        child = children.get(part)
        if child is None:
            reached = ".".join(parts[:depth]) or "the root"
            return f"`{reached}` has no submodule named `{part}` (it has: {', '.join(children) or 'none'})"
        envoy = child
    return envoy
