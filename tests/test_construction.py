"""Building an adapter: widths, initialisation, placement, and bad input."""

import math

import pytest
import torch
from conftest import TARGETS, envoy_at, load
from nnsight import LanguageModel
from transformers import AutoTokenizer

from nnsight_toolbox import LORA, Optimization
from nnsight_toolbox.optim.lora import LORA as LORA_from_module


def test_both_import_paths_give_the_same_class():
    from nnsight_toolbox.optim import LORA as from_optim

    assert from_optim is LORA_from_module is LORA
    assert issubclass(LORA, Optimization)


def hf_module(model, path):
    return model._module.get_submodule(path)


def test_widths_of_known_layers_come_from_their_weights(model, family):
    linear = TARGETS[family]["linear"]
    lora = LORA(envoy_at(model, linear), r=3)
    weight = hf_module(model, linear).weight
    if family == "gpt2":  # Conv1D: weight (in, out)
        expected = (weight.shape[0], weight.shape[1])
    else:  # Linear: weight (out, in)
        expected = (weight.shape[1], weight.shape[0])
    assert (lora.input_dim, lora.output_dim) == expected
    assert lora.input_dim != lora.output_dim, "the fixture should include a non-square target"
    assert lora.WA.shape == (expected[0], 3)
    assert lora.WB.shape == (3, expected[1])


@pytest.mark.parametrize("kind", ["mlp", "layer", "attn"])
def test_widths_of_blocks_come_from_a_scan(model, family, kind):
    lora = LORA(envoy_at(model, TARGETS[family][kind]), r=2)
    hidden = model._module.config.hidden_size
    assert lora.WA.shape == (hidden, 2)
    assert lora.WB.shape == (2, hidden)


def test_embedding_adapter_is_indexed_by_token_id(gpt2):
    lora = LORA(gpt2.transformer.wte, r=4)
    assert lora.takes_ids
    assert lora.WA.shape == (gpt2._module.config.vocab_size, 4)


def test_a_model_loaded_without_weights_works(model_paths):
    path = model_paths["llama"]
    meta = LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path))
    assert next(meta._module.parameters()).device.type == "meta"
    block = LORA(meta.model.layers[0].mlp, r=4)
    linear = LORA(meta.model.layers[0].self_attn.q_proj, r=4)
    assert block.WA.device.type == "cpu" and linear.WB.device.type == "cpu"
    assert block.WA.shape == (32, 4) and linear.WB.shape == (4, 32)
    with meta.trace("Hello"):  # the first trace loads the weights; the adapter follows
        block()
        out = meta.lm_head.output.save()
    assert torch.isfinite(out).all()
    assert next(meta._module.parameters()).device.type == "cpu"


def test_initialisation_matches_peft_and_changes_nothing(gpt2):
    torch.manual_seed(0)
    lora = LORA(gpt2.transformer.h[0].mlp.c_fc, r=16)
    bound = 1 / math.sqrt(lora.input_dim)
    assert lora.WA.abs().max() <= bound
    assert lora.WA.abs().max() > 0.8 * bound, "kaiming-uniform should fill its range"
    assert lora.WA.std() > 0.5 * bound / math.sqrt(3)
    assert torch.count_nonzero(lora.WB) == 0


def test_parameters_are_a_list_in_the_requested_dtype(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4, dtype=torch.float64)
    params = lora.parameters()
    assert isinstance(params, list) and len(params) == 2
    assert params[0] is lora.WA and params[1] is lora.WB
    assert all(p.dtype == torch.float64 and p.requires_grad for p in params)


def test_behaves_like_a_torch_module(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    with torch.no_grad():
        lora.WB.fill_(0.25)
    state = lora.state_dict()
    assert set(state) == {"WA", "WB"}
    other = LORA(gpt2.transformer.h[0].mlp, r=4)
    other.load_state_dict(state)
    assert torch.equal(other.WA, lora.WA) and torch.equal(other.WB, lora.WB)
    wa = lora.WA
    lora.to(torch.float64)
    assert lora.WA is wa and lora.WA.dtype == torch.float64, "`.to` keeps the same Parameter objects"
    assert lora.eval().training is False and lora.train().training is True


def test_deepcopy_copies_weights_but_shares_the_model(gpt2):
    import copy

    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    clone = copy.deepcopy(lora)
    assert clone.module is lora.module
    assert clone.WA is not lora.WA and torch.equal(clone.WA, lora.WA)


def test_repr_names_the_module_and_shapes(gpt2):
    text = repr(LORA(gpt2.transformer.h[0].mlp.c_fc, r=4))
    assert "model.transformer.h.0.mlp.c_fc" in text and "input_dim=32" in text and "output_dim=128" in text


@pytest.mark.parametrize("r", [0, -1, 2.5, "8", True, None])
def test_rank_must_be_a_positive_int(gpt2, r):
    with pytest.raises(ValueError, match=r"`r` \(the rank\) must be a positive int"):
        LORA(gpt2.transformer.h[0].mlp, r=r)


def test_a_raw_torch_module_is_refused_with_how_to_wrap_it(gpt2):
    with pytest.raises(TypeError, match="Wrap the model with nnsight") as info:
        LORA(gpt2._module.transformer.h[0].mlp, r=4)
    assert "Conv1D" in str(info.value) or "GPT2MLP" in str(info.value)


def test_other_objects_are_refused(gpt2):
    with pytest.raises(TypeError, match="needs the nnsight Envoy"):
        LORA("transformer.h.0.mlp", r=4)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, "0.1"])
def test_dropout_must_be_a_probability(gpt2, dropout):
    with pytest.raises(ValueError, match="`dropout` must be a probability"):
        LORA(gpt2.transformer.h[0].mlp, r=4, dropout=dropout)


def test_dtype_must_be_floating(gpt2):
    with pytest.raises(TypeError, match="floating torch dtype"):
        LORA(gpt2.transformer.h[0].mlp, r=4, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_dtype_is_refused_at_construction(gpt2, dtype):
    """float8 is floating point, but torch has no matmul for it: refuse it here, not in the first trace."""
    with pytest.raises(TypeError, match=r"`dtype` must be .*`torch\.float32`.*float8"):
        LORA(gpt2.transformer.h[0].mlp, r=4, dtype=dtype)


def test_a_scanned_output_without_a_tensor_is_named():
    from nnsight_toolbox.optim.dims import dims_from_values

    with pytest.raises(TypeError, match="holds no tensor") as info:
        dims_from_values("model.some.module", torch.zeros(1, 2, 3), (None, torch.zeros(1)))
    assert "model.some.module" in str(info.value)


def test_a_module_taking_token_ids_needs_an_embedding(gpt2):
    with pytest.raises(TypeError, match="token ids"):
        LORA(gpt2.transformer, r=4)


def test_explicit_widths_are_validated(gpt2):
    with pytest.raises(ValueError, match="`input_dim` must be a positive int"):
        LORA(gpt2.transformer.h[0].mlp, r=4, input_dim=0, output_dim=4)
    lora = LORA(gpt2.transformer.h[0].mlp, r=4, input_dim=32, output_dim=32)
    assert lora.WA.shape == (32, 4)


def test_widths_of_an_unscannable_module_must_be_given():
    from nnsight import NNsight

    net = NNsight(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    assert LORA(net[0], r=2).WB.shape == (2, 8)
    with pytest.raises(ValueError, match="Pass `input_dim=` and `output_dim=`"):
        LORA(net[1], r=2)
    assert LORA(net[1], r=2, input_dim=8, output_dim=8).WA.shape == (8, 2)
