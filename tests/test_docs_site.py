"""The documentation site builds with no warnings, and documents every public name with an example.

The build is the one the README names, ``mkdocs build --strict``: any warning
(a cross-reference to a name that does not exist, a link to a missing page or
anchor, a docstring mkdocstrings cannot read) fails it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="the docs build needs the `docs` extra: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs build needs the `docs` extra: pip install -e '.[docs]'")

from public_api import EXTENSION_PAGE, EXTENSION_POINTS, ROOT, has_examples, public_objects  # noqa: E402  (needs griffe, from the `docs` extra)


def build(config: Path, site: Path, *, notebooks: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # a theme banner, not a build warning
    env["DOCS_EXECUTE_NOTEBOOKS"] = "true" if notebooks else "false"  # mkdocs.yml reads it
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    result = build(ROOT / "mkdocs.yml", folder)
    assert result.returncode == 0, f"`mkdocs build --strict` failed:\n{result.stdout}\n{result.stderr}"
    # mkdocs's own warnings start their line; the notebook kernel's "[IPKernelApp] WARNING |
    # Kernel is running over TCP without encryption" is about its local sockets, not the site.
    assert not re.search(r"^WARNING\b", result.stderr, flags=re.M), result.stderr
    return folder


def anchors(site: Path, pages: list[Path] | None = None) -> set[str]:
    found: set[str] = set()
    for page in (site / "api").rglob("*.html") if pages is None else pages:
        found.update(re.findall(r'id="([\w.]+)"', page.read_text()))
    return found


def user_pages(site: Path) -> list[Path]:
    """The API reference's pages but the one for writing a kind of your own."""
    return [page for page in (site / "api").rglob("*.html") if page != site / EXTENSION_PAGE]


NOTEBOOK_PAGES = {
    "examples/paris_walkthrough/index.html": ("with LoRA:    &#39; Paris&#39;", "with LoRA:    ' Paris'"),
    "examples/what_the_adapter_learned/index.html": ("the adapted model answers",),
    "examples/compare_interventions/index.html": ("best alpha",),
    "examples/steering_from_pairs/index.html": ("at alpha=0",),
}


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(NOTEBOOK_PAGES))
def test_the_notebooks_are_pages_with_their_outputs(site, page):
    """Executed when the site is built: their printed results and plots are on the page."""
    html = (site / page).read_text()
    assert any(text in html for text in NOTEBOOK_PAGES[page]), f"{page} does not show the notebook's printed result"
    assert "data:image/png;base64," in html, f"{page} shows no plot"
    for noise in ("Loading weights", "Writing model shards", "deprecated"):
        assert noise not in html, f"{page} shows {noise!r}"


def nav_titles() -> dict[str, str]:
    """``{page: title}`` of the notebook pages, as mkdocs.yml's nav names them."""
    nav = (ROOT / "mkdocs.yml").read_text().split("nav:", 1)[1].split("\n\n", 1)[0]
    return {page: title for title, page in re.findall(r"^\s+- (.+): (examples/[\w.-]+\.ipynb)\s*$", nav, flags=re.M)}


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(NOTEBOOK_PAGES))
def test_the_notebook_pages_have_their_whole_titles(site, page):
    """The page's `<title>` is the nav's title for it, and its table of contents links to its headings.

    mkdocs-jupyter drops inline code from a notebook's headings where it lists them: with a title
    from the first heading, "Teach a tiny GPT-2 to say" was the page's `<title>` and sidebar entry."""
    html = (site / page).read_text()
    title = nav_titles()[page.removesuffix("/index.html") + ".ipynb"]
    assert f"<title>{title} - nnsight-toolbox</title>" in html, f"{page}'s <title> is not {title!r}"
    ids = set(re.findall(r'id="([^"]+)"', html))
    broken = [anchor for anchor in re.findall(r'href="#([^"]+)" class="md-nav__link"', html) if anchor not in ids]
    assert not broken, f"{page}'s table of contents links to anchors the page lacks (a heading with inline code?): {broken}"


def test_the_notebook_pages_are_the_notebooks_of_examples():
    linked = {p.name: p.resolve() for p in (ROOT / "docs" / "examples").glob("*.ipynb")}
    notebooks = {p.name: p.resolve() for p in (ROOT / "examples").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts}
    assert linked == notebooks, "docs/examples/ should link every notebook of examples/ (relative symlinks)"


def extension_point(path: str) -> str | None:
    name = path.rsplit(".", 1)[-1]
    return name if name in EXTENSION_POINTS else None


@pytest.mark.slow
def test_every_public_name_has_an_entry_in_the_api_reference(site):
    """A name a user calls has its own entry; an extension point (`intervene`, ...) has one on the
    page for writing a kind of your own, whichever class it is reached through."""
    found = anchors(site)
    assert (site / EXTENSION_PAGE).exists(), f"no {EXTENSION_PAGE}: the page that documents the extension points"
    extension = {extension_point(anchor) for anchor in anchors(site, [site / EXTENSION_PAGE])} - {None}
    objects = public_objects()
    missing = [obj.name for obj in objects if not extension_point(obj.name) and not found.intersection(obj.paths)]
    assert not missing, f"public names with no entry in the API reference (docs/api/*.md): {missing}"
    missing = sorted({extension_point(obj.name) for obj in objects} - {None} - extension)
    assert not missing, f"extension points with no entry on {EXTENSION_PAGE}: {missing}"


@pytest.mark.slow
def test_the_user_pages_leave_out_the_extension_points(site):
    """`reads_input`, `intervene`, ... are how a kind plugs into the machinery, not what a user calls."""
    shown = sorted(anchor for anchor in anchors(site, user_pages(site)) if extension_point(anchor))
    assert not shown, f"the API reference lists extension points as user API: {shown} (mkdocs.yml's `filters`, a page's `inherited_members`)"


def test_the_public_names_are_what_users_import():
    """The checks above cover the package's exports and the methods of its classes,
    and not the helpers of implementation modules (`artifacts/files.py`, ...)."""
    import nnsight_toolbox

    names = {path for obj in public_objects() for path in obj.paths}
    exported = {f"nnsight_toolbox.{name}" for name in nnsight_toolbox.__all__ if name != "__version__"}
    assert exported <= names, exported - names
    assert {"nnsight_toolbox.LORA.save", "nnsight_toolbox.LORA.load", "nnsight_toolbox.LORA.merged"} <= names
    assert not any(".artifacts.files." in name for name in names)


def test_every_public_name_has_a_docstring_with_an_example():
    missing = [obj.name for obj in public_objects() if not has_examples(obj.obj)]
    assert not missing, f"public names whose docstring has no `Examples:` section: {missing}"


@pytest.mark.slow
def test_a_broken_reference_fails_the_build(tmp_path):
    """The strictness is real: a reference to a name that does not exist stops the build."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "src").symlink_to(ROOT / "src", target_is_directory=True)
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [`LORA.merge`][nnsight_toolbox.LORA.no_such_method].\n")
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site", notebooks=False)
    assert result.returncode != 0
    assert "nnsight_toolbox.LORA.no_such_method" in result.stderr
