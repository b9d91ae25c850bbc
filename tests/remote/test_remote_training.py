"""Training a LoRA on the server inside `model.session(remote=True)`, against a real NDIF stack.

The same loop with the same seed and data is run locally, the way the README
trains (`loss.backward()` here, after each trace): losses and trained weights
must agree, and the weights must arrive in the client's adapter.
"""

from __future__ import annotations

import copy

import nnsight
import pytest
import torch
import torch.nn.functional as F

from nnsight_toolbox import LORA, LoraSet
from nnsight_toolbox.remote import save_weights

from .conftest import TARGET

pytestmark = pytest.mark.remote

PROMPT = "_" * 8
STEPS = 8
SEED = 1234


def target_ids(model) -> torch.Tensor:
    return torch.tensor(model.tokenizer(" ").input_ids)  # teach it to answer with a space


def train_remotely(model, lora, target):
    with model.session(remote=True):
        torch.manual_seed(SEED)  # on the server: the dropout masks
        optimizer = torch.optim.AdamW(lora.parameters(), lr=5e-2)
        losses = nnsight.save([])
        for step in range(STEPS):
            with model.trace(PROMPT):
                lora()
                logits = model.lm_head.output[:, -1].save()
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        weights = save_weights(lora)
    return losses, weights


def train_locally(model, lora, target):
    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=5e-2)
    losses = []
    for step in range(STEPS):
        with model.trace(PROMPT):
            lora()
            logits = model.lm_head.output[:, -1].save()
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_remote_session_training_matches_local(remote_model, local_model):
    lora = LORA(remote_model.get(TARGET), r=4, dropout=0.1)
    initial = copy.deepcopy(lora.state_dict())
    local_lora = LORA(local_model.get(TARGET), r=4, dropout=0.1)
    local_lora.load_state_dict(initial)

    losses, weights = train_remotely(remote_model, lora, target_ids(remote_model))
    # Training ran on the server's copies: the client's adapter is untouched until it loads them.
    assert all(torch.equal(lora.state_dict()[name], value) for name, value in initial.items())
    lora.load_state_dict(weights)

    local_losses = train_locally(local_model, local_lora, target_ids(local_model))
    assert losses == pytest.approx(local_losses, rel=1e-5)
    assert losses[-1] < losses[0]
    for name, value in local_lora.state_dict().items():
        assert torch.allclose(lora.state_dict()[name], value, atol=1e-6), name
    assert not torch.equal(lora.WB, initial["WB"])  # it did train


def test_a_set_trains_in_a_remote_session_as_locally(remote_model, local_model):
    """The same loop with a `LoraSet`: one optimizer over every adapter, one call per trace."""
    adapters = LORA.on(remote_model, ["q_proj", "v_proj"], r=4)
    initial = copy.deepcopy(adapters.state_dict())
    local = LORA.on(local_model, ["q_proj", "v_proj"], r=4)
    local.load_state_dict(initial)

    losses, weights = train_remotely(remote_model, adapters, target_ids(remote_model))
    adapters.load_state_dict(weights)
    local_losses = train_locally(local_model, local, target_ids(local_model))

    assert isinstance(adapters, LoraSet) and len(adapters) == 4
    assert losses == pytest.approx(local_losses, rel=1e-5)
    assert losses[-1] < losses[0]
    for name, value in local.state_dict().items():
        assert torch.allclose(adapters.state_dict()[name], value, atol=1e-6), name
        assert not name.endswith("WB") or not torch.equal(value, initial[name]), f"{name} did not train"
