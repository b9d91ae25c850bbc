"""A PEFT adapter with DoRA and `modules_to_save` studied on a real NDIF server.

The adapter is built and exported locally, imported onto the client's meta model
(as a user imports one from the hub) and traced remotely; the remote logits must
equal the local trace of the same import, and differ from the base model's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_logits

from nnsight_toolbox import LoraSet, export_peft, import_peft
from nnsight_toolbox.optim.dora import DoRA
from nnsight_toolbox.optim.module_copy import ModuleCopy

pytestmark = pytest.mark.remote

PROMPT = "The Eiffel Tower is in"


def test_dora_and_a_module_copy_apply_remotely_as_locally(remote_model, local_model, tmp_path):
    generator = torch.Generator().manual_seed(0)
    dora = DoRA(local_model.get("model.layers.0.mlp.up_proj"), r=4)
    copy = ModuleCopy(local_model.get("model.layers.1.mlp.down_proj"))
    with torch.no_grad():
        dora.WB.copy_(torch.randn(dora.WB.shape, generator=generator))
        dora.magnitude.mul_(1.5)
        for parameter in copy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    export_peft(LoraSet([dora, copy]), tmp_path / "peft")

    remote_set = import_peft(remote_model, tmp_path / "peft")
    local_set = import_peft(local_model, tmp_path / "peft")
    assert sorted(remote_set) == sorted(local_set) == ["model.model.layers.0.mlp.up_proj", "model.model.layers.1.mlp.down_proj"]

    with remote_model.trace(PROMPT, remote=True):
        remote_set()
        remote_logits = remote_model.lm_head.output.save()
    with local_model.trace(PROMPT):
        local_set()
        local_logits = local_model.lm_head.output.save()

    assert torch.allclose(remote_logits, local_logits, atol=1e-5)
    assert not torch.allclose(remote_logits, hf_logits(local_model, PROMPT), atol=1e-3)  # the adapter did act
