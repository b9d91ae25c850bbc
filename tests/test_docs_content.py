"""What a newcomer reads first: the current nnsight API, the README's order and facts, the home page's links.

Each check reads the files as text; the code in them is run elsewhere
(tests/test_docs_code.py, tests/test_notebooks.py, tests/test_docstring_examples.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import nnsight_toolbox

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def shown_code() -> dict[str, str]:
    """Every file a reader copies code from: pages, examples, notebooks' code cells, the package's source."""
    files = {p: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("*.py"), *(ROOT / "src").rglob("*.py")]}
    for notebook in (ROOT / "examples").rglob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        files[notebook] = "\n".join("".join(cell["source"]) for cell in cells)
    return {p.relative_to(ROOT).as_posix(): text for p, text in files.items()}


def test_examples_load_models_with_transformers_model():
    """nnsight 0.8 deprecates `LanguageModel`: no example builds one (the text may say it still works)."""
    found = {name: text.count("LanguageModel(") for name, text in shown_code().items() if "LanguageModel(" in text}
    assert not found, f"`LanguageModel(` in {found}: load with `TransformersModel(..., task='text-generation')` or `load_tiny_model`"
    assert "TransformersModel" in README and "`LanguageModel`" in README  # the one note that it still works


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv .venv"))
    assert f"```bash\n{command}\n```" in README, "the README's set-up + test command must be .ci/run's, verbatim"


def test_the_readme_quick_check_is_the_ci_test_command_without_the_slow_tests():
    """The first check the README offers runs what CI runs, less the tests marked `slow`."""
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv .venv"))
    pytest_call = command.rsplit(" && ", 1)[1]
    assert pytest_call.startswith(".venv/bin/python -m pytest"), pytest_call
    quick = f'{pytest_call} -m "not slow"'
    assert f"```bash\n{quick}\n```" in README, f"the README should offer `{quick}` as the quick check"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^\s+"slow: ', pyproject, flags=re.M), "register the `slow` marker in pyproject.toml"
    marked = [p.name for p in (ROOT / "tests").rglob("test_*.py") if "@pytest.mark.slow" in p.read_text()]
    assert {"test_docs_site.py", "test_notebooks.py", "test_benchmarks.py"} <= set(marked), marked


def test_the_readme_starts_with_what_it_is_then_how_to_set_up():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    assert headings[0].startswith("Set up"), f"the first section should be the set-up commands, not {headings[0]!r}"
    setup = README.index("## " + headings[0])
    for later in ("## Quickstart", "## On models served by NDIF", "## Performance"):
        assert README.index(later) > setup
    assert README.count(".venv/bin/pip install -e \".[test]\" && ") == 2  # the example's command and the tests'


def test_the_readme_dates_the_old_toolbox_right():
    assert "0.7 and earlier" not in README
    assert "0.3.7" in README and "0.4" in README


def test_the_home_page_links_every_guide_and_names_every_export():
    home = (ROOT / "docs" / "index.md").read_text()
    nxt = home[home.index("## Where to go next") :]
    guides = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs" / "guides").glob("*.md"))
    missing = [g for g in guides if f"]({g})" not in nxt]
    assert not missing, f"'Where to go next' does not link {missing}"
    assert "](migration.md)" in nxt
    exported = [name for name in nnsight_toolbox.__all__ if name != "__version__"]
    missing = [name for name in exported if f"[nnsight_toolbox.{name}]" not in nxt]
    assert not missing, f"the API bullet leaves out {missing}"


def test_the_navigation_names_each_page_once():
    """No "API reference › API reference": a section's pages have their own titles."""
    nav = (ROOT / "mkdocs.yml").read_text().split("nav:", 1)[1].split("\n\n", 1)[0]
    untitled = re.findall(r"^\s+- ([\w/.-]+\.(?:md|ipynb))\s*$", nav, flags=re.M)
    assert not untitled, f"nav entries without a title take the page's own: {untitled}"
    assert "migration.md" in nav


@pytest.mark.parametrize("name", ["nnsight_toolbox/optim/lora.py", "nnsight_toolbox/optim/adapter_set.py"])
def test_docstring_examples_agree_with_the_reference_setup(name):
    """docs/api/index.md sets up `lora` with r=8; an example that builds `lora` builds the same, and
    learning rates stay in the range the guide recommends (1e-3 to 5e-2)."""
    source = (ROOT / "src" / name).read_text()
    for rank in re.findall(r">>> lora = LORA\(model\.transformer\.h\[0\]\.mlp, r=(\d+)\)", source):
        assert rank == "8", f"{name} builds `lora` with r={rank}, the reference's has r=8"
    for lr in re.findall(r"lr=([0-9.e-]+)", source):
        assert 1e-3 <= float(lr) <= 5e-2, f"{name} shows lr={lr}, outside the guide's 1e-3 to 5e-2"


def test_notebook_headings_have_no_inline_code():
    """mkdocs-jupyter lists a notebook's headings without their inline code: "A sweep of `alpha`"
    read "A sweep of ," in the page's contents, and its link missed the heading's anchor."""
    found = []
    for notebook in sorted((ROOT / "examples").rglob("*.ipynb")):
        for cell in json.loads(notebook.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                found += [f"{notebook.name}: {line}" for line in "".join(cell["source"]).splitlines() if line.startswith("#") and "`" in line]
    assert not found, f"headings with inline code: {found}"


def test_the_readme_and_the_docs_talk_about_the_project_not_its_development():
    """No commit hashes or issue numbers: benchmarks/reports/ keeps the history, with its sources."""
    commit = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
    issue = re.compile(r"(?i)\bissue\s*#?\d+|\bthe issue's\b")
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        found += [f"{page.relative_to(ROOT)}: {m.group()}" for pattern in (commit, issue) for m in pattern.finditer(text)]
    assert not found, f"development history in the README or the docs: {found}"
    assert commit.search("source f283ae3") and issue.search("issue 16's per-call cuts")  # what the old README had
