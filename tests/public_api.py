"""The package's public API and its docstrings, read as the documentation tools read them.

griffe is the library mkdocstrings renders the API reference with; reading the
source through it means these tests see the same objects, docstrings (those of
attributes included) and line numbers that the site shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nnsight_toolbox"

#: Public names that are torch hooks this package overrides, not API of its own.
NOT_API = {"extra_repr"}

#: Class attributes that describe a kind to the machinery. Each is documented once, on the
#: base that declares it (`ModuleIntervention`, `Optimization`); a kind that sets its own
#: value uses that attribute, it does not add a public name.
KIND_SETTINGS = {"call_name", "alpha_means", "reads_input", "reads_output", "reads_positions"}
SETTINGS_DECLARED_ON = {"ModuleIntervention", "Optimization"}

#: Members by which a kind plugs into the package's machinery: the machinery calls or reads
#: them, a user calls none of them. The API reference documents them once, on the page for
#: writing a kind of your own (EXTENSION_PAGE), and leaves them out of every other page
#: (mkdocs.yml's `filters`). They are still public: each keeps its docstring and example.
EXTENSION_POINTS = {"intervene", "reads_input", "reads_output", "reads_positions", "config", "call_name", "alpha_means"}
EXTENSION_PAGE = "api/module-intervention/index.html"


@dataclass(frozen=True)
class PublicObject:
    """One public object: the names it is public under, and its definition."""

    paths: tuple[str, ...]  # e.g. ("nnsight_toolbox.LORA", "nnsight_toolbox.optim.LORA", ...)
    obj: griffe.Object

    @property
    def name(self) -> str:
        return self.paths[0]


def load_package() -> griffe.Module:
    return griffe.load(PACKAGE, search_paths=[str(ROOT / "src")], docstring_parser="google", resolve_aliases=True)


def public_modules(package: griffe.Module) -> list[griffe.Module]:
    """The package and the modules directly in it: ``nnsight_toolbox``, ``.optim``,
    ``.artifacts``, ``.testing``, the modules users import from.

    A module one level deeper (``optim/lora.py``, ``artifacts/files.py``) is
    implementation: its ``__all__`` is its interface to the rest of the
    package, and the names users get from it are those its package re-exports."""
    return [package, *(member for member in package.members.values() if not member.is_alias and member.is_module)]


def public_objects(package: griffe.Module | None = None) -> list[PublicObject]:
    """Every name in the ``__all__`` of a public module (`public_modules`), and the
    public members of the classes among them (those inherited from the package's
    own classes too), each once, under all the paths it is public under, shortest first."""
    package = package or load_package()
    paths: dict[str, list[str]] = {}
    objects: dict[str, griffe.Object] = {}

    def add(path: str, obj: griffe.Object) -> None:
        target = obj.final_target if obj.is_alias else obj
        objects[target.path] = target
        paths.setdefault(target.path, []).append(path)
        if target.is_class:
            for name, member in target.all_members.items():
                if name.startswith("_") or name in NOT_API:
                    continue
                owner = (member.final_target if member.is_alias else member).parent
                if name in KIND_SETTINGS and owner is not None and owner.name not in SETTINGS_DECLARED_ON:
                    continue
                add(f"{path}.{name}", member)

    for module in public_modules(package):
        for name in module.exports or ():
            if name != "__version__":
                add(f"{module.path}.{name}", module.members[name])
    return [
        PublicObject(tuple(sorted(set(found), key=lambda p: (p.count("."), p))), objects[target])
        for target, found in sorted(paths.items())
    ]


def documented_objects(package: griffe.Module | None = None) -> list[griffe.Object]:
    """Every object of the package that has a docstring, private ones included."""
    package = package or load_package()
    found: list[griffe.Object] = []

    def walk(obj: griffe.Object) -> None:
        if obj.docstring is not None:
            found.append(obj)
        for member in obj.members.values():
            if not member.is_alias:
                walk(member)

    walk(package)
    return found


def has_examples(obj: griffe.Object) -> bool:
    return obj.docstring is not None and any(
        section.kind is griffe.DocstringSectionKind.examples for section in obj.docstring.parsed
    )
