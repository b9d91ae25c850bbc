"""The guide "Train a LoRA on a model you can't load" runs, remotely, and agrees with the same code run locally.

Its ```python blocks run top to bottom in one namespace against the NDIF stack,
with the served checkpoint swapped for the tiny one. Then the same blocks run
locally (`remote=False`, weights loaded here), and the two runs must agree:
losses, trained weights and generated tokens.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.remote

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "remote.md"
#: What the guide serves, and what the tests serve instead.
SERVED_MODEL = 'TransformersModel("meta-llama/Llama-3.1-8B", task="text-generation")'
SERVED_LAYER = "model.model.layers[16]"
TINY_LAYER = "model.model.layers[1]"


def guide_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert blocks, "the guide should show runnable code"
    return blocks


def run_guide(blocks: list[str], path: str, script: Path, *, remote: bool) -> dict:
    source = "\n".join(blocks)
    assert SERVED_MODEL in source and SERVED_LAYER in source
    model = f"TransformersModel({path!r}, task='text-generation', tokenizer=AutoTokenizer.from_pretrained({path!r}){'' if remote else ', dispatch=True'})"
    source = source.replace(SERVED_MODEL, model).replace(SERVED_LAYER, TINY_LAYER)
    if not remote:
        source = source.replace("remote=True", "remote=False")
    script.write_text("from transformers import AutoTokenizer\n" + source)  # nnsight reads a trace's source from its file
    torch.manual_seed(0)  # the same initial adapter in both runs
    return runpy.run_path(str(script))


def test_guide_runs_remotely_and_matches_local(client, tmp_path):
    blocks = guide_blocks()
    remote = run_guide(blocks, client.model_path, tmp_path / "guide_remote.py", remote=True)
    # `blocking=False` has no local meaning: the local twin skips that block and recomputes it below.
    local_blocks = [block for block in blocks if "blocking=False" not in block]
    assert len(local_blocks) == len(blocks) - 1
    local = run_guide(local_blocks, client.model_path, tmp_path / "guide_local.py", remote=False)

    # A remote trace: a fresh adapter is the identity.
    assert torch.allclose(remote["adapted_logits"], remote["base_logits"])
    assert torch.allclose(remote["base_logits"], local["base_logits"], atol=1e-5)

    # A remote training session: same losses, and the trained weights arrived in the client's adapter.
    assert remote["losses"] == pytest.approx(local["losses"], rel=1e-5)
    assert remote["losses"][-1] < remote["losses"][0]
    for name, value in local["lora"].state_dict().items():
        assert torch.allclose(remote["lora"].state_dict()[name], value, atol=1e-6), name
    assert remote["lora"].WB.abs().sum() > 0  # trained: WB starts at zero

    # Remote generation: token for token the local result, and the adapter changed it.
    assert torch.equal(remote["ids"], local["ids"])
    assert remote["adapted"] != remote["base"]

    # Non-blocking: the adapted model's last logits, as computed locally.
    model, lora = local["model"], local["lora"]
    with model.trace(local["prompt"]):
        lora()
        last = model.lm_head.output[:, -1].save()
    assert torch.allclose(remote["result"]["last"], last, atol=1e-5)
