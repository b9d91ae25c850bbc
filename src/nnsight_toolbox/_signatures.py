"""Readable signatures in ``help()``: the public API's annotations as objects, not strings.

The modules use ``from __future__ import annotations`` (and import some names
only for type checkers, to avoid import cycles), so every annotation is stored
as a string, and ``help(LORA)`` printed ``module: 'Envoy', r: 'int'``. Once the
whole package is imported, every name exists; `resolve` evaluates the strings
of the public classes' and functions' signatures and stores the objects.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any


def resolve(objects: list[Any], names: dict[str, Any]) -> None:
    """Evaluate the string annotations of ``objects`` (functions, and the methods
    and properties of classes) in their module's globals plus ``names``, forward
    references inside aliases (``Union["LORA", ...]``) included; a function whose
    annotations do not all evaluate keeps them as they were."""
    for obj in objects:
        for function in _functions(obj):
            try:
                resolved = typing.get_type_hints(function, globalns={**function.__globals__, **names}, include_extras=True)
            except Exception:  # noqa: BLE001 - a string the runtime cannot evaluate stays a string
                continue
            function.__annotations__ = {name: None if hint is type(None) else hint for name, hint in resolved.items()}


def _functions(obj: Any) -> list[Any]:
    if inspect.isfunction(obj):
        return [obj]
    found = []
    for value in vars(obj).values() if inspect.isclass(obj) else ():
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            found.append(value)
    return found
