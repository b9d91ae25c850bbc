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
- ``<!-- expect-output -->`` on the line before a non-python fence (```text)
  says that fence is what the python block before it prints: the block's
  stdout must equal it, line by line, except that a decimal number may differ
  by one unit in its last printed digit (float rounding across CPUs).
"""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

# What a reader's code triggers, the pages must not: a deprecation from nnsight fails here.
pytestmark = pytest.mark.filterwarnings("error::nnsight.NNsightDeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
EXPECT_ERROR = re.compile(r"<!--\s*expect-error:\s*(?P<name>[\w.]+)\s*-->")
EXPECT_OUTPUT = re.compile(r"^<!--\s*expect-output\s*-->[ \t]*\n(?P<indent>[ \t]*)```(?!python)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
NUMBER = re.compile(r"(-?\d+\.\d+)")


@dataclass(frozen=True)
class Block:
    """One ```python fence: its code, the page line its code starts on, the error it
    must raise, and what it must print (the ``expect-output`` fence after it)."""

    source: str
    line: int
    expect_error: str | None
    expect_output: str | None = None


def code_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("body")) + 1
        source = textwrap.dedent(match.group("body"))  # fences indented in lists and admonitions
        previous = text[: match.start()].rstrip().splitlines()[-1:]
        marker = EXPECT_ERROR.search(previous[0]) if previous else None
        blocks.append(Block(source, line, marker["name"] if marker else None))
    for match in EXPECT_OUTPUT.finditer(text):
        before = [i for i, block in enumerate(blocks) if block.line <= text.count("\n", 0, match.start()) + 1]
        if not before:
            raise ValueError(f"the `expect-output` fence at line {text.count(chr(10), 0, match.start()) + 1} follows no ```python block")
        i = before[-1]
        if blocks[i].expect_output is not None:
            raise ValueError(f"the ```python block at line {blocks[i].line} has two `expect-output` fences")
        blocks[i] = Block(blocks[i].source, blocks[i].line, blocks[i].expect_error, textwrap.dedent(match.group("body")))
    return blocks


def output_differences(printed: str, expected: str) -> list[str]:
    """The lines where ``printed`` differs from ``expected``; a decimal number may be off by one in its last digit."""
    got, want = printed.rstrip("\n").splitlines(), expected.rstrip("\n").splitlines()
    differences = [f"printed {len(got)} lines, the page shows {len(want)}"] if len(got) != len(want) else []
    for number, (a, b) in enumerate(zip(got, want), start=1):
        a_parts, b_parts = NUMBER.split(a.rstrip()), NUMBER.split(b.rstrip())
        same = len(a_parts) == len(b_parts) and all(
            x == y if k % 2 == 0 else (len(x.split(".")[1]) == len(y.split(".")[1]) and abs(float(x) - float(y)) <= 1.01 * 10 ** -len(y.split(".")[1]))
            for k, (x, y) in enumerate(zip(a_parts, b_parts))
        )
        if not same:
            differences.append(f"line {number}: printed {a!r}, the page shows {b!r}")
    return differences


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
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(script.read_text(), str(script), "exec"), namespace)
        except Exception as error:
            if block.expect_error and raised(error, block.expect_error):
                continue
            raise AssertionError(f"{where} raised {type(error).__name__}: {error}") from error
        finally:
            print(printed.getvalue(), end="")  # still shown by pytest on a failure
        if block.expect_error:
            raise AssertionError(f"{where} is marked `expect-error: {block.expect_error}` but raised nothing")
        if block.expect_output is not None and (differences := output_differences(printed.getvalue(), block.expect_output)):
            raise AssertionError(
                f"{where} prints something else than the `expect-output` block under it:\n  " + "\n  ".join(differences)
                + f"\nIt printed:\n{printed.getvalue()}"
            )
    return namespace


#: Pages whose code needs an NDIF server: tests/remote/ runs them against a real one.
REMOTE_PAGES = {"docs/guides/remote.md": "tests/remote/test_remote_guide.py"}

#: Pages whose quickstart shows what it prints, checked by its `expect-output` fence.
QUICKSTARTS = ["README.md", "docs/index.md"]


@pytest.mark.slow  # each page is a whole program, so the quick subset (`-m "not slow"`) leaves them out
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=relative)
def test_page_code_runs_top_to_bottom(page, tmp_path, monkeypatch):
    if relative(page) in REMOTE_PAGES:
        pytest.skip(f"needs an NDIF server: run against a real one by {REMOTE_PAGES[relative(page)]} (`pytest -m remote`)")
    monkeypatch.chdir(tmp_path)  # whatever a page writes lands in the temporary folder
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_page(page, tmp_path)


@pytest.mark.parametrize("name", QUICKSTARTS)
def test_the_quickstart_shows_what_it_prints(name):
    """The README's and the home page's quickstart are one program, and show their output."""
    blocks = code_blocks((ROOT / name).read_text())
    quickstart = next((b for b in blocks if b.expect_output is not None), None)
    assert quickstart is not None, f"{name} shows no `<!-- expect-output -->` fence after its quickstart"
    assert "with LoRA:    ' Paris'" in quickstart.expect_output
    readme = next(b for b in code_blocks((ROOT / "README.md").read_text()) if b.expect_output is not None)
    assert (quickstart.source, quickstart.expect_output) == (readme.source, readme.expect_output), f"{name}'s quickstart differs from the README's"


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
    assert [b.expect_output for b in blocks] == [None, None, None]
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


def test_a_block_must_print_its_expected_output(tmp_path):
    page = tmp_path / "printing.md"
    shown = "```python\nprint(f'loss {1/3:.2f}')\nprint('done')\n```\n\n<!-- expect-output -->\n```text\n{}\n```\n"
    page.write_text(shown.replace("{}", "loss 0.34\ndone"))  # one unit off in the last digit: accepted
    run_page(page, tmp_path)
    for wrong, message in [("loss 0.35\ndone", "line 1: printed 'loss 0.33'"), ("loss 0.33\nDone", "line 2"), ("loss 0.33", "printed 2 lines, the page shows 1")]:
        page.write_text(shown.replace("{}", wrong))
        with pytest.raises(AssertionError, match=re.escape(message)):
            run_page(page, tmp_path)
