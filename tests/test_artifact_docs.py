"""The ```python blocks of the artifacts guide and README section run top to bottom."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "save-load-export.md"
SECTION = ROOT / "docs" / "README-artifacts-section.md"
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_blocks(blocks: list[str], tmp_path: Path) -> dict:
    # Every path the docs write starts with /tmp/tiny-gpt2: keep them inside the test's folder.
    source = "\n".join(blocks).replace("/tmp/tiny-gpt2", str(tmp_path / "tiny-gpt2"))
    script = tmp_path / "docs_code.py"  # nnsight reads a trace's source from its file
    script.write_text(source)
    return runpy.run_path(str(script))


def test_the_guide_runs(tmp_path):
    blocks = python_blocks(GUIDE.read_text())
    assert len(blocks) >= 5, "the guide should show set-up, save/load, export, import and merge"
    namespace = run_blocks(blocks, tmp_path)
    assert list(namespace["loras"]) == [
        "model.transformer.h.0.attn.c_attn",
        "model.transformer.h.0.mlp.c_fc",
        "model.transformer.h.1.attn.c_attn",
        "model.transformer.h.1.mlp.c_fc",
    ]


def test_the_readme_section_runs_after_the_quickstart(tmp_path):
    """As the README will hold it: the Quickstart, then this section, in one namespace."""
    readme = README.read_text()
    section = SECTION.read_text()
    blocks = python_blocks(readme)
    if "## Keep, share and merge adapters" not in readme:
        blocks += python_blocks(section)
    namespace = run_blocks(blocks, tmp_path)
    assert namespace["c_fc"].merged is False
    adapted, base = namespace["model"].tokenizer.batch_decode(namespace["ids"][:, -3:])
    assert adapted.startswith(" ") and adapted != base  # the README test's own check still holds
