"""Every ```python block of the README runs, top to bottom, in one namespace."""

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_code_runs(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert blocks, "the README should show runnable code"
    source = "\n".join(blocks).replace("/tmp/tiny-gpt2", str(tmp_path / "tiny-gpt2"))
    script = tmp_path / "readme_code.py"  # nnsight reads a trace's source from its file
    script.write_text(source)
    namespace = runpy.run_path(str(script))
    ids = namespace["ids"]
    tokenizer = namespace["model"].tokenizer
    adapted, base = tokenizer.batch_decode(ids[:, -3:])
    assert adapted.startswith(" ") and adapted != base
