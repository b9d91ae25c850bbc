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


def perturbed_pair(cls, remote_model, local_model, path, seed, **kwargs):
    """An intervention on the served model with non-zero parameters, and its twin on the local copy."""
    generator = torch.Generator().manual_seed(seed)
    remote = cls(remote_model.get(path), **kwargs)
    with torch.no_grad():
        for parameter in remote.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    local = cls(local_model.get(path), **kwargs)
    local.load_state_dict(remote.state_dict())
    return remote, local


def test_a_set_of_steering_and_loreft_with_positions_applies_remotely_as_locally(remote_model, local_model):
    from nnsight_toolbox import InterventionSet, LoReFT, SteeringVector

    steer, local_steer = perturbed_pair(SteeringVector, remote_model, local_model, "model.layers.0", seed=1)
    reft, local_reft = perturbed_pair(LoReFT, remote_model, local_model, "model.layers.1", seed=2, r=2)
    remote_set, local_set = InterventionSet([steer, reft]), InterventionSet([local_steer, local_reft])
    prompts = ["The Eiffel Tower is in", "Hi"]

    def run(model, interventions, remote):
        with model.trace(remote=remote) as tracer:
            with tracer.invoke(prompts[0]):
                interventions(positions=slice(-2, None))
            with tracer.invoke(prompts[1]):
                pass
            with tracer.invoke():
                logits = model.lm_head.output.save()
        return logits

    remote_logits = run(remote_model, remote_set, True)
    local_logits = run(local_model, local_set, False)
    with local_model.trace() as tracer:
        with tracer.invoke(prompts[0]):
            pass
        with tracer.invoke(prompts[1]):
            pass
        with tracer.invoke():
            base = local_model.lm_head.output.save()
    assert torch.allclose(remote_logits, local_logits, atol=1e-5)
    assert not torch.allclose(remote_logits[0, -1], base[0, -1], atol=1e-3)  # acted on its row's last tokens
    assert torch.allclose(remote_logits[1], base[1], atol=1e-5)  # not on the other invoke's row


def test_a_soft_prompt_generates_remotely_as_locally(remote_model, local_model):
    from nnsight_toolbox import SoftPrompt

    prompt, local_prompt = perturbed_pair(SoftPrompt, remote_model, local_model, "model.embed_tokens", seed=3, n=2)
    text = "xxThe Eiffel Tower is in"  # two placeholder tokens in front

    def run(model, soft, remote):
        with model.generate(text, max_new_tokens=4, do_sample=False, remote=remote) as tracer:
            soft()
            ids = tracer.result.save()
        return ids

    assert torch.equal(run(remote_model, prompt, True), run(local_model, local_prompt, False))
