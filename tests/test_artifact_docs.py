"""The ```python blocks of the artifacts guide run top to bottom (the README's run in test_readme)."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "save-load-export.md"


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
