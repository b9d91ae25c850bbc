"""The notebooks in examples/ run top to bottom in a real Jupyter kernel, and are committed without outputs.

Each runs as a reader would run it, on the tiny offline model it builds by
default, with matplotlib drawing off screen. A cell that raises fails the test
with the cell's traceback; the checks below then read what the notebook
printed and drew.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks need the `notebooks` extra: pip install -e '.[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="the notebooks need the `notebooks` extra: pip install -e '.[notebooks]'")
pytest.importorskip("ipykernel", reason="the notebooks need the `notebooks` extra: pip install -e '.[notebooks]'")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "examples").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
STRIP = "strip it with `python tests/test_notebooks.py` (or Jupyter's Clear All Outputs) before committing"


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def execute(path: Path, folder: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},  # the kernel's working folder
    )
    client.execute()
    return notebook


def text_output(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def figures(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def check_paris(notebook) -> None:
    """The adapted invoke answers ` Paris`, the base one does not, and the loss curve is drawn."""
    lines = dict(line.split(":", 1) for line in text_output(notebook).splitlines() if ":" in line)
    assert lines["with LoRA"].strip() == "' Paris'"
    assert lines["without LoRA"].strip() != "' Paris'"
    assert figures(notebook) >= 1


def check_study(notebook) -> None:
    """The three plots are drawn (the notebook asserts its own numbers)."""
    assert "the adapted model answers ' Paris'" in text_output(notebook)
    assert figures(notebook) >= 3


def all_output_text(notebook) -> list[tuple[int, str]]:
    """(cell number, text) of every stream and every plain-text result."""
    found = []
    for number, cell in enumerate(notebook.cells, start=1):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            text = output.get("text", "") if output.output_type == "stream" else output.get("data", {}).get("text/plain", "")
            found.append((number, text if isinstance(text, str) else "".join(text)))
    return found


def check_quiet(notebook, name: str) -> None:
    """Only training shows progress: no deprecation, no load bars, no printed model tree."""
    for number, text in all_output_text(notebook):
        assert "deprecated" not in text.lower(), f"{name}, cell {number} warns of something deprecated:\n{text[-2000:]}"
        for noise in ("Writing model shards", "Loading weights"):
            assert noise not in text, f"{name}, cell {number} shows transformers' {noise!r} bar"
        assert not text.startswith(("GPT2LMHeadModel(", "TransformersModel(", "LanguageModel(")), (
            f"{name}, cell {number} prints the whole model: end the cell with `;`"
        )


def check_compare(notebook) -> None:
    """All three learn the answer, and the loss curves and the alpha sweep are drawn."""
    text = text_output(notebook)
    assert text.count("' Paris'") == 3, text
    assert figures(notebook) >= 2


def check_contrast(notebook) -> None:
    """The vectors are read, the sweep's baseline is printed, and the projections and the sweep are drawn
    (the notebook asserts its own numbers: alpha=0 is the same for every layer, and steering moves the answer)."""
    text = text_output(notebook)
    assert "at alpha=0" in text and "model.transformer.h.3: |v| =" in text, text
    assert figures(notebook) >= 2


CHECKS = {
    "examples/compare/compare_interventions.ipynb": check_compare,
    "examples/contrast/steering_from_pairs.ipynb": check_contrast,
    "examples/paris/paris_walkthrough.ipynb": check_paris,
    "examples/study/what_the_adapter_learned.ipynb": check_study,
}


def test_the_notebooks_are_found():
    assert set(CHECKS) <= {relative(p) for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=relative)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert "widgets" not in notebook.metadata, f"{relative(path)} holds the state of progress-bar widgets: {STRIP}"
    for number, cell in enumerate(notebook.cells, start=1):
        if cell.cell_type != "code":
            continue
        assert not cell.outputs, f"{relative(path)}, cell {number} has outputs: {STRIP}"
        assert cell.execution_count is None, f"{relative(path)}, cell {number} has an execution count: {STRIP}"
        assert not cell.metadata.get("execution"), f"{relative(path)}, cell {number} has timing metadata: {STRIP}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=relative)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # No MPLBACKEND=Agg here: the kernel's own inline backend is already headless,
    # and it is what puts the figures into the outputs the checks read.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet the kernel's debugger warning
    notebook = execute(path, tmp_path)
    check_quiet(notebook, relative(path))
    CHECKS.get(relative(path), lambda _: None)(notebook)


def strip(path: Path) -> None:
    """Remove outputs, execution counts, timing metadata and widget state, in place."""
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)


if __name__ == "__main__":
    for path in NOTEBOOKS:
        strip(path)
        print(f"stripped {relative(path)}")
