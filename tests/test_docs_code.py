"""Every ```python block of the README and of docs/**/*.md runs, page by page, top to bottom.

A page is one program: its blocks run in order, in one namespace, as a reader
who pastes them one after another into a notebook would run them. A page added
under ``docs/`` is picked up without touching this file; shown code that no
longer works fails here, with the page and line it came from.

Conventions for the pages:

- Only ```python fences run; ```bash, ```text, ```diff and plain ``` fences do not.
- Paths under ``/tmp/`` are moved into a fresh temporary folder, so a page can
  write ``save_tiny_model("gpt2", "/tmp/tiny-gpt2")`` as a reader would.
- ``<!-- expect-error: OutOfOrderError -->`` on the line before a fence says
  the block must raise that exception (its class or a base class, by name):
  for a gotcha that shows code that fails. The page goes on after it.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
EXPECT_ERROR = re.compile(r"<!--\s*expect-error:\s*(?P<name>[\w.]+)\s*-->")


@dataclass(frozen=True)
class Block:
    """One ```python fence: its code, the page line its code starts on, and the error it must raise."""

    source: str
    line: int
    expect_error: str | None


def code_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("body")) + 1
        source = textwrap.dedent(match.group("body"))  # fences indented in lists and admonitions
        previous = text[: match.start()].rstrip().splitlines()[-1:]
        marker = EXPECT_ERROR.search(previous[0]) if previous else None
        blocks.append(Block(source, line, marker["name"] if marker else None))
    return blocks


def relative(page: Path) -> str:
    return page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name


PAGES_WITH_CODE = [page for page in PAGES if code_blocks(page.read_text())]


def raised(error: BaseException, name: str) -> bool:
    return any(cls.__name__ == name.rsplit(".", 1)[-1] for cls in type(error).__mro__)


def run_page(page: Path, tmp_path: Path) -> dict:
    """Run the page's blocks in one namespace and return it."""
    namespace: dict = {"__name__": "__main__"}
    for block in code_blocks(page.read_text()):
        source = block.source.replace("/tmp/", f"{tmp_path}/")
        # nnsight reads a trace's source back from its file, so each block gets
        # one, padded so that a traceback's line numbers are the page's.
        script = tmp_path / f"{page.stem}_line{block.line}.py"
        script.write_text("\n" * (block.line - 1) + source)
        where = f"{relative(page)}, the block at line {block.line}"
        try:
            exec(compile(script.read_text(), str(script), "exec"), namespace)
        except Exception as error:
            if block.expect_error and raised(error, block.expect_error):
                continue
            raise AssertionError(f"{where} raised {type(error).__name__}: {error}") from error
        if block.expect_error:
            raise AssertionError(f"{where} is marked `expect-error: {block.expect_error}` but raised nothing")
    return namespace


def check_readme(namespace: dict) -> None:
    """The quickstart's batch: the adapted invoke answers with a space, the base one does not."""
    adapted, base = namespace["model"].tokenizer.batch_decode(namespace["ids"][:, -3:])
    assert adapted.startswith(" ") and adapted != base


#: Pages whose code needs an NDIF server: tests/remote/ runs them against a real one.
REMOTE_PAGES = {"docs/guides/remote.md": "tests/remote/test_remote_guide.py"}

#: Claims about a page's results that its code does not assert itself.
CHECKS = {"README.md": check_readme}


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=relative)
def test_page_code_runs_top_to_bottom(page, tmp_path, monkeypatch):
    if relative(page) in REMOTE_PAGES:
        pytest.skip(f"needs an NDIF server: run against a real one by {REMOTE_PAGES[relative(page)]} (`pytest -m remote`)")
    monkeypatch.chdir(tmp_path)  # whatever a page writes lands in the temporary folder
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = run_page(page, tmp_path)
    CHECKS.get(relative(page), lambda _: None)(namespace)


def test_the_readme_and_every_guide_show_code():
    guides = sorted((ROOT / "docs" / "guides").glob("*.md"))
    assert guides, "docs/guides/ should hold the task pages"
    for page in [ROOT / "README.md", *guides, ROOT / "docs" / "gotchas.md"]:
        assert page in PAGES_WITH_CODE, f"{relative(page)} shows no ```python block, so no test runs its code"


@pytest.mark.parametrize("page", sorted((ROOT / "docs" / "guides").glob("*.md")), ids=relative)
def test_every_guide_has_the_same_sections(page):
    """A task page says what it is for, shows the canonical code, and lists the gotchas, in that order."""
    headings = [line[3:].strip() for line in page.read_text().splitlines() if line.startswith("## ")]
    expected = ["What it is for", "The code", "Gotchas"]
    assert [h for h in headings if h in expected] == expected, f"{relative(page)} has sections {headings}"


def test_the_block_extractor_sees_indented_fences_and_markers():
    text = textwrap.dedent(
        """\
        Intro.

        ```python
        a = 1
        ```

        <!-- expect-error: ValueError -->
        ```python
        raise ValueError
        ```

        !!! note
            ```python
            b = a + 1
            ```

        ```bash
        echo not python
        ```
        """
    )
    blocks = code_blocks(text)
    assert [b.source for b in blocks] == ["a = 1\n", "raise ValueError\n", "b = a + 1\n"]
    assert [b.line for b in blocks] == [4, 9, 14]
    assert [b.expect_error for b in blocks] == [None, "ValueError", None]


def test_a_page_whose_code_fails_fails_with_its_location(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text("# Broken\n\n```python\nx = 1\n```\n\n```python\ny = x + undefined_name\n```\n")
    with pytest.raises(AssertionError, match=r"the block at line 8 raised NameError"):
        run_page(page, tmp_path)
    page.write_text("<!-- expect-error: NameError -->\n```python\nz = 1\n```\n")
    with pytest.raises(AssertionError, match="raised nothing"):
        run_page(page, tmp_path)
