"""The DAS example reaches the published hierarchical-equality figure on its first seed, offline.

The run takes about 25 s on one CPU core (seed 0, the script's defaults: the
paper's code for the MLP, pyvene's tutorial for the rotation). The thresholds are
the issue's: task accuracy >= 0.99, DAS IIA >= 0.95, the untrained rotation <= 0.7,
and the best localist alignment (``W == X`` on 8 raw neurons, ``Y == Z`` on the
other 8, the best of all 12,870 choices) clearly lower: at least 0.05 below DAS.
Seed 0 gives 0.9981, 0.9717, 0.5983 and 0.8711 (a margin of 0.10), the docs
table's row. Other seeds reach less (see docs/guides/das.md): this test pins
the one the docs show reaching the figure, not every MLP.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the example script, run whole

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "das" / "hierarchical_equality.py"


def test_das_finds_w_equals_x_in_eight_dimensions_of_the_first_layer():
    result = subprocess.run([sys.executable, str(EXAMPLE), "--seed", "0"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["task_accuracy"] >= 0.99, numbers
    assert numbers["das_iia"] >= 0.95, numbers
    assert numbers["untrained_rotation_iia"] <= 0.7, numbers
    assert numbers["best_8_neurons_iia"] <= numbers["das_iia"] - 0.05, numbers  # the localist alignment
    assert "deprecated" not in result.stderr.lower(), result.stderr[-3000:]
