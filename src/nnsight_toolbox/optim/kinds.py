"""The kinds of intervention, by class name: filled by defining them.

Every subclass of `ModuleIntervention` enters this registry when its class
statement runs (``ModuleIntervention.__init_subclass__``), the package's own
kinds and a user's alike. The file format, the collections and PEFT import read
it, so a new kind is one class and no list anywhere needs an edit. A class
defined again under the same name (a notebook cell run twice) replaces the
entry, so a load builds the newest definition.

Examples:
    >>> from nnsight_toolbox.optim.kinds import kind_named
    >>> kind_named("SteeringVector").__name__
    'SteeringVector'
"""

from __future__ import annotations

__all__ = ["KINDS", "register", "kind_named"]

class _Registry(dict):
    """A dict that pickles empty.

    A remote request ships this package by value, and with it every global its
    functions name: the registry would carry every kind defined on the client,
    whatever the request uses. The server's registry fills as it rebuilds the
    classes the request does use.
    """

    def __reduce__(self) -> tuple:
        return (_Registry, ())


#: Class name -> the newest class of that name.
KINDS: dict[str, type] = _Registry()


def register(cls: type) -> None:
    """Record ``cls`` under its class name, replacing an older class of that name.

    Examples:
        >>> class Probe: pass
        >>> register(Probe); KINDS["Probe"] is Probe
        True
    """
    KINDS[cls.__name__] = cls


def kind_named(name: object, where: str = "") -> type:
    """The registered kind called ``name``, or a `ValueError` that lists the known ones.

    A saved directory names its kinds; one defined in a notebook must be defined
    again (or its module imported) before the directory loads.

    Examples:
        >>> kind_named("LORA").__name__
        'LORA'
    """
    cls = KINDS.get(name) if isinstance(name, str) else None
    if cls is None:
        known = ", ".join(sorted(k for k in KINDS if not k.startswith("_")))
        raise ValueError(
            f"{where + ': ' if where else ''}the kind {name!r} is not defined here (known kinds: {known}). "
            f"If it is a kind of your own, run its class definition (or import the module that "
            f"defines it) before loading; if it came from a newer nnsight-toolbox, upgrade."
        )
    return cls
