"""Which modules a set of adapters goes on: PEFT's ``target_modules`` rule.

The rule is PEFT's (``check_target_module_exists`` in ``peft/tuners/tuners_utils.py``),
so a config that works there picks the same modules here:

- a **string** is a regular expression that must match the *whole* module path
  (``re.fullmatch``): ``r".*\\.attn\\.c_attn"``;
- a **list** matches a module whose path equals an entry or ends with ``"."``
  plus the entry: ``["q_proj", "v_proj"]`` matches every ``...self_attn.q_proj``;
- ``layers=`` keeps only modules inside the chosen layers, PEFT's
  ``layers_to_transform``: the layer index is the number after the first
  ``layers.``, ``layer.``, ``h.`` or ``blocks.`` in the path.

Paths are those of the Hugging Face model (``transformer.h.0.attn.c_attn``), as
in PEFT; the nnsight spelling with the root's name in front
(``model.transformer.h.0.attn.c_attn``) matches too.

Unlike PEFT, a list entry that matches nothing is an error rather than silently
ignored: ``["q_proj", "v_porj"]`` is a typo, not a request for half the adapters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Union

import torch

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["Targets", "Layers", "match_targets", "layer_index"]

#: What ``targets=`` accepts: a regex for the whole path, or a list of names / path suffixes.
Targets = Union[str, Iterable[str]]
#: What ``layers=`` accepts: one layer index or several.
Layers = Union[int, Iterable[int], None]

#: The first ``<layers|layer|h|blocks>.<index>`` in a path, as PEFT's common layer patterns.
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")

#: How many example paths an error shows.
EXAMPLES = 6


def layer_index(path: str) -> int | None:
    """The layer a module path lies in, or ``None`` outside any numbered layer.

    Examples:
        >>> layer_index("transformer.h.3.attn.c_attn")
        3
        >>> layer_index("lm_head") is None
        True
    """
    match = LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


def match_targets(envoy: "Envoy", targets: Targets, layers: Layers = None) -> list[str]:
    """The paths, relative to ``envoy``'s module, of the modules ``targets`` picks, in model order.

    Model order is the order of ``named_modules()``, the order transformers
    registers (and, for its decoders, runs) the layers in.

    Args:
        envoy: The nnsight Envoy to search under, usually the model itself.
        targets: A regex that must match the whole path, or a list of module
            names / path suffixes (PEFT's ``target_modules``).
        layers: Keep only modules inside these layer indices (PEFT's
            ``layers_to_transform``); ``None`` keeps every match.

    Raises:
        ValueError: If ``targets`` or ``layers`` picks no module; the message
            shows module names and paths that exist.
        TypeError: If ``targets`` or ``layers`` has the wrong type.

    Examples:
        >>> match_targets(model, ["c_attn"], layers=[0, 1])
        ['transformer.h.0.attn.c_attn', 'transformer.h.1.attn.c_attn']
    """
    entries = _check_targets(targets)
    chosen_layers = _check_layers(layers)
    prefix = f"{envoy.path}."
    paths = [path for path, _ in envoy._module.named_modules() if path]

    def picks(entry: str, path: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(entry, path) is not None or re.fullmatch(entry, prefix + path) is not None
        return path == entry or path.endswith(f".{entry}") or prefix + path == entry

    matched: list[str] = []
    unmatched = set(entries)
    for path in paths:
        hits = {entry for entry in entries if picks(entry, path)}
        if hits:
            unmatched -= hits
            matched.append(path)
    if unmatched:
        raise ValueError(_no_match_message(envoy, targets, sorted(unmatched), paths))
    if chosen_layers is None:
        return matched
    in_layers = [path for path in matched if layer_index(path) in chosen_layers]
    if not in_layers:
        found = sorted({i for i in map(layer_index, matched) if i is not None})
        raise ValueError(
            f"`targets={targets!r}` matched {len(matched)} modules, but none in "
            f"`layers={layers!r}`. Layer indices among the matches: {found or 'none'} "
            f"(the number after `layers.`, `layer.`, `h.` or `blocks.` in a path, e.g. "
            f"{matched[0]!r}). Pick layers from those, or pass `layers=None`."
        )
    return in_layers


def _check_targets(targets: Any) -> list[str]:
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise ValueError(
                f"`targets={targets!r}` is a string, so it is read as a regular "
                f"expression for the whole module path, and it does not compile: "
                f"{error}. For module names, pass a list: `targets=['q_proj', 'v_proj']`."
            ) from None
        return [targets]
    if isinstance(targets, torch.nn.Module) or not isinstance(targets, Iterable):
        raise TypeError(
            f"`targets` must be a regex string for the whole module path or a list of "
            f"module names, such as `['q_proj', 'v_proj']`; got {type(targets).__name__}."
        )
    entries = list(targets)
    if not entries or not all(isinstance(entry, str) and entry for entry in entries):
        raise TypeError(
            f"`targets` must be a non-empty list of module names or path suffixes "
            f"(strings), such as `['q_proj', 'v_proj']`; got {entries!r}."
        )
    return entries


def _check_layers(layers: Any) -> frozenset[int] | None:
    if layers is None:
        return None
    chosen = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    try:
        chosen = frozenset(chosen)
    except TypeError:
        chosen = None
    if not chosen or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in chosen):
        raise TypeError(
            f"`layers` must be a non-negative layer index or a non-empty list of them, "
            f"such as `layers=[0, 1]`; got {layers!r}."
        )
    return chosen


def _no_match_message(envoy: "Envoy", targets: Targets, unmatched: list[str], paths: list[str]) -> str:
    """An error that shows what could have been written instead."""
    # Leaf names first: the list form is how most people write targets.
    leaves = [path for path in paths if not any(True for _ in envoy._module.get_submodule(path).children())]
    names = list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in leaves if not path.rsplit(".", 1)[-1].isdigit()))
    # Paths inside the first layer say most: the rest repeat them with another index.
    examples = ([path for path in leaves if layer_index(path) == 0] + [path for path in leaves if layer_index(path) is None])[:EXAMPLES]
    what = f"`targets={targets!r}`" if isinstance(targets, str) else f"The entries {unmatched!r} of `targets`"
    return (
        f"{what} matched no module of `{envoy.path}`. A string is a regular expression "
        f"that must match a whole module path; a list entry matches a path equal to it "
        f"or ending in '.' + the entry. Module names here include: {', '.join(names[:12])}; "
        f"paths such as: {', '.join(examples)}."
    )
