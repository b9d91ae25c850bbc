"""The Paris example runs offline, prints " Paris" only for the adapted invoke, and warns of nothing deprecated."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "paris" / "train_paris.py"


@pytest.mark.slow
def test_the_paris_example_completes_with_paris_only_when_adapted():
    result = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "100"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert lines["with LoRA"].strip() == "' Paris'"
    assert lines["without LoRA"].strip() != "' Paris'"
    assert "deprecated" not in result.stderr.lower(), result.stderr[-3000:]
    assert "Writing model shards" not in result.stderr and "Loading weights" not in result.stderr, "transformers' load bars should be quiet"
