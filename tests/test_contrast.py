"""`SteeringVector.from_contrast`: vectors read from contrastive pairs, checked against the reference libraries.

The references share no code with the package:

- steering-vectors 0.12.2 (`train_steering_vector` with `mean_aggregator` /
  `pca_aggregator`, and `SteeringVector.apply` for CAA's application), run on
  the raw Hugging Face module with its tokenizer;
- repeng 0.4.0 (`ControlVector.train` with `pca_diff` / `pca_center`), whose
  layer ``i`` is ``hidden_states[i + 1]``, the output of block ``i``;
- nnsight itself, reading one prompt alone, unpadded, for each reading.

Both libraries read each prompt alone here (batch size 1): with left padding
and no position ids, Hugging Face's GPT-2 counts padded columns as positions,
so their own batched readings would be off (`test_hand_written_position_ids_break_left_padding`).
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest
import torch
from conftest import family_params

from nnsight_toolbox import InterventionSet, SteeringVector
from nnsight_toolbox.optim.contrast import aggregate_contrast, read_contrast
from nnsight_toolbox.testing import load_tiny_model

steering_vectors = pytest.importorskip("steering_vectors", reason="the reference libraries: pip install --no-deps -r tests/references.txt")

# CAA-style A/B pairs (the answer letter is the last token) and free-text pairs, of different lengths,
# so that batches are padded. An odd number of pairs: repeng's vote cannot tie.
POSITIVE = ["Q: Is it kind? A: (A", "I love this film", "yes", "The answer is A", "Paris is lovely", "good", "Sure, I can help with that"]
NEGATIVE = ["Q: Is it kind? A: (B", "I hate this film", "no", "The answer is B", "Paris is dreadful", "bad!", "No"]
PAIRS = list(zip(POSITIVE, NEGATIVE))
LAYERS = {"gpt2": "transformer.h", "llama": "model.layers"}


@pytest.fixture(scope="module", params=family_params(sorted(LAYERS)))
def lm(request, tmp_path_factory):
    """A tiny 3-layer model of each family (3 so that repeng's layers 0 and 1 are not the last, which it reads after the final norm)."""
    return load_tiny_model(request.param, tmp_path_factory.mktemp(request.param), layers=3, initializer_range=0.2)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_tiny_model("gpt2", tmp_path_factory.mktemp("gpt2"), layers=3, initializer_range=0.2)


def layer(model, i: int):
    return model.get(f"{LAYERS[model._module.config.model_type]}.{i}")


def reading_alone(model, envoy, prompt: str, position: int) -> torch.Tensor:
    """The module's output at ``position`` of ``prompt`` run alone (no padding), by nnsight directly."""
    with torch.no_grad(), model.trace(prompt):
        out = envoy.output
        out = (out[0] if isinstance(out, tuple) else out)[0, position].save()
    return out.float()


@contextlib.contextmanager
def padding_side(model, side: str):
    before = model.tokenizer.padding_side
    model.tokenizer.padding_side = side
    try:
        yield
    finally:
        model.tokenizer.padding_side = before


@pytest.fixture(scope="module")
def repeng_extract():
    """repeng 0.4.0's `extract` module. It imports `gguf` at the top (used only by GGUF export, which no test
    calls: a stub module stands in) and names `np.float_` in annotations, which NumPy 2 removed (aliased to
    `np.float64` while it imports). Neither touches `read_representations` or PCA."""
    stubbed = "gguf" not in sys.modules
    if stubbed:
        sys.modules["gguf"] = types.ModuleType("gguf")
    aliased = not hasattr(np, "float_")
    if aliased:
        np.float_ = np.float64
    try:
        from repeng import extract
    finally:
        if aliased:
            del np.float_
        if stubbed:
            del sys.modules["gguf"]
    return extract


# -- against steering-vectors ---------------------------------------------------------


@pytest.mark.parametrize("method", ["mean", "pca"])
def test_mean_and_pca_equal_steering_vectors(lm, method):
    from steering_vectors import mean_aggregator, pca_aggregator, train_steering_vector

    aggregator = mean_aggregator() if method == "mean" else pca_aggregator()
    reference = train_steering_vector(lm._module, lm.tokenizer, PAIRS, layers=[0, 1, 2], read_token_index=-1, aggregator=aggregator)
    ours = SteeringVector.from_contrast([layer(lm, i) for i in range(3)], POSITIVE, NEGATIVE, method=method, batch_size=4)
    for i, vector in enumerate(ours):
        expected = reference.layer_activations[i].float()
        assert expected.norm() > 0.1  # a real direction, not a degenerate one
        torch.testing.assert_close(vector.v.detach(), expected, atol=2e-5, rtol=1e-4)
        assert vector.v.dtype == torch.float32 and isinstance(vector.v, torch.nn.Parameter)
        if method == "pca":
            assert abs(vector.v.norm().item() - 1) < 1e-5
    assert [v.path for v in ours] == [layer(lm, i).path for i in range(3)]


# -- against repeng -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_pca_diff_and_pca_center_equal_repeng(lm, method, repeng_extract):
    dataset = [repeng_extract.DatasetEntry(positive=p, negative=n) for p, n in PAIRS]
    # batch_size=1: each text alone, unpadded (see the module docstring). Layer i is hidden_states[i + 1].
    reference = repeng_extract.ControlVector.train(lm._module, lm.tokenizer, dataset, hidden_layers=[0, 1], method=method, batch_size=1)
    ours = SteeringVector.from_contrast([layer(lm, 0), layer(lm, 1)], PAIRS, method=method, batch_size=3)
    for i, vector in enumerate(ours):
        torch.testing.assert_close(vector.v.detach(), torch.from_numpy(reference.directions[i]), atol=2e-5, rtol=1e-4)
        assert abs(vector.v.norm().item() - 1) < 1e-5


def random_readings(seed: int, n: int = 7, width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(width, generator=generator)  # a common offset, so centring matters
    positive = torch.randn(n, width, generator=generator) + shared + torch.randn(width, generator=generator)
    negative = torch.randn(n, width, generator=generator) + shared
    return positive, negative


def repeng_directions(repeng_extract, positive: torch.Tensor, negative: torch.Tensor, method: str, monkeypatch) -> np.ndarray:
    """repeng's `read_representations` on given readings: its reading step is replaced by them
    (rows in its order: positive, negative, positive, ...)."""
    hidden = torch.stack([positive, negative], 1).reshape(-1, positive.shape[1]).numpy().astype(np.float32)
    monkeypatch.setattr(repeng_extract, "batched_get_hiddens", lambda *args, **kwargs: {0: hidden.copy()})
    fake_model = types.SimpleNamespace(model=types.SimpleNamespace(layers=[None]))  # `model_layer_list` reads model.model.layers
    dataset = [repeng_extract.DatasetEntry("", "") for _ in range(positive.shape[0])]
    return repeng_extract.read_representations(fake_model, None, dataset, hidden_layers=[0], method=method)[0]


@pytest.mark.parametrize("seed", range(4))
def test_aggregation_equals_both_references_on_random_readings(seed, repeng_extract, monkeypatch):
    from steering_vectors import mean_aggregator, pca_aggregator

    positive, negative = random_readings(seed)
    torch.testing.assert_close(aggregate_contrast(positive, negative, "mean"), mean_aggregator()(positive, negative), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aggregate_contrast(positive, negative, "pca"), pca_aggregator()(positive, negative), atol=1e-5, rtol=1e-4)
    for method in ("pca_diff", "pca_center"):
        expected = torch.from_numpy(repeng_directions(repeng_extract, positive, negative, method, monkeypatch))
        torch.testing.assert_close(aggregate_contrast(positive, negative, method), expected, atol=1e-5, rtol=1e-4)


def test_the_two_sign_rules_disagree_and_each_method_keeps_its_own(repeng_extract, monkeypatch):
    """One large difference along +x and three small ones along -x: the mean points to +x
    (steering-vectors' sign), but three pairs of four vote for -x (repeng's)."""
    from steering_vectors import pca_aggregator

    negative = torch.zeros(4, 3)
    positive = torch.tensor([[10.0, 0.0, 0.0], [-1.0, 0.2, 0.0], [-1.0, -0.2, 0.1], [-1.0, 0.0, -0.1]])
    sv = pca_aggregator()(positive, negative)
    rp = torch.from_numpy(repeng_directions(repeng_extract, positive, negative, "pca_diff", monkeypatch))
    assert sv[0] > 0.9 and rp[0] < -0.9  # the references themselves disagree
    torch.testing.assert_close(aggregate_contrast(positive, negative, "pca"), sv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aggregate_contrast(positive, negative, "pca_diff"), rp, atol=1e-6, rtol=1e-5)


def test_a_tied_vote_keeps_the_sign_repeng_keeps(repeng_extract, monkeypatch):
    """Two pairs voting opposite ways: repeng leaves scikit-learn's sign (largest entry positive), and so must we."""
    negative = torch.zeros(2, 3)
    for positive in (torch.tensor([[3.0, 0.0, 0.1], [-1.0, 0.5, 0.0]]), torch.tensor([[-3.0, 0.0, 0.1], [1.0, 0.5, 0.0]])):
        for method in ("pca_diff", "pca_center"):
            expected = torch.from_numpy(repeng_directions(repeng_extract, positive, negative, method, monkeypatch))
            torch.testing.assert_close(aggregate_contrast(positive, negative, method), expected, atol=1e-6, rtol=1e-5)


# -- reading: padding, batches, positions ----------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("position", [-1, 1, 0, -2])
def test_each_reading_equals_its_prompt_run_alone(lm, side, position):
    envoys = [layer(lm, 0), layer(lm, 2)]
    with padding_side(lm, side):
        pos, neg = read_contrast(envoys, POSITIVE, NEGATIVE, positions=position, batch_size=len(POSITIVE) * 2)
    for k, envoy in enumerate(envoys):
        for readings, prompts in ((pos[k], POSITIVE), (neg[k], NEGATIVE)):
            alone = torch.stack([reading_alone(lm, envoy, prompt, position) for prompt in prompts])
            torch.testing.assert_close(readings, alone, atol=1e-5, rtol=1e-4)


def test_hand_written_position_ids_break_left_padding(gpt2):
    """Why the mask must reach nnsight: GPT-2 given a left-padded batch with positions counted over the
    padded columns (what passing `position_ids=arange(T)` does) reads a padded row wrongly, which would
    fail `test_each_reading_equals_its_prompt_run_alone`."""
    prompts = ["yes", "Sure, I can help with that"]
    batch = gpt2.tokenizer(prompts, return_tensors="pt", padding=True)  # left-padded: nnsight set the side
    assert gpt2.tokenizer.padding_side == "left" and not bool(batch.attention_mask[0].all())
    width = batch.input_ids.shape[1]
    with torch.no_grad():
        counted = gpt2._module(**batch, position_ids=torch.arange(width)[None].expand(2, -1), output_hidden_states=True)
    wrong = counted.hidden_states[1][0, -1]  # block 0's output at "yes"'s last token
    right = reading_alone(gpt2, gpt2.transformer.h[0], "yes", -1)
    assert (wrong - right).abs().max() > 1e-3
    ours, _ = read_contrast(gpt2.transformer.h[0], prompts, prompts, batch_size=4)
    torch.testing.assert_close(ours[0][0], right, atol=1e-5, rtol=1e-4)


def test_the_batch_size_never_changes_the_result(lm):
    envoys = [layer(lm, 1)]
    results = {b: SteeringVector.from_contrast(envoys[0], POSITIVE, NEGATIVE, method="pca", batch_size=b).v.detach() for b in (1, 3, 14, 64)}
    for b, v in results.items():
        torch.testing.assert_close(v, results[1], atol=1e-5, rtol=1e-4, msg=lambda m: f"batch_size={b}: {m}")


def test_many_layers_in_one_pass_cost_the_forward_passes_of_one(gpt2):
    SteeringVector(gpt2.transformer.h[0])  # the model's one layout scan (see `layout`) happens before counting
    calls = []
    handle = gpt2._module.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        one = SteeringVector.from_contrast(gpt2.transformer.h[1], POSITIVE, NEGATIVE, batch_size=4)
        passes_for_one = len(calls)
        calls.clear()
        # Out of forward order on purpose: each module has an invoke of its own.
        many = SteeringVector.from_contrast([gpt2.transformer.h[2], gpt2.transformer.h[0], gpt2.transformer.h[1]], POSITIVE, NEGATIVE, batch_size=4)
        passes_for_many = len(calls)
    finally:
        handle.remove()
    assert passes_for_one == passes_for_many == 4  # 14 prompts, 4 per pass
    assert isinstance(many, InterventionSet) and isinstance(one, SteeringVector)
    assert [v.path for v in many] == ["model.transformer.h.2", "model.transformer.h.0", "model.transformer.h.1"]
    torch.testing.assert_close(many[2].v, one.v, atol=1e-6, rtol=1e-5)
    # Each layer's vector is its own: the mean difference of its own readings, prompt by prompt.
    for vector in many:
        envoy = gpt2.get(vector.path.split(".", 1)[1])
        expected = torch.stack([reading_alone(gpt2, envoy, p, -1) - reading_alone(gpt2, envoy, n, -1) for p, n in PAIRS]).mean(0)
        torch.testing.assert_close(vector.v.detach(), expected, atol=1e-5, rtol=1e-4)


def test_a_model_left_in_training_mode_reads_without_dropout_and_stays_in_training_mode(tmp_path):
    model = load_tiny_model("gpt2", tmp_path / "dropout", layers=2, initializer_range=0.2, resid_pdrop=0.5, embd_pdrop=0.5)
    expected = SteeringVector.from_contrast(model.transformer.h[1], POSITIVE, NEGATIVE).v.detach()  # loaded in eval mode
    model._module.train()
    with torch.no_grad(), model.trace(POSITIVE[0]):
        noisy = model.transformer.h[1].output[0, -1].save()
    assert (noisy - reading_alone(model, model.transformer.h[1], POSITIVE[0], -1)).abs().max() > 1e-2  # dropout does act
    for _ in range(2):
        torch.testing.assert_close(SteeringVector.from_contrast(model.transformer.h[1], POSITIVE, NEGATIVE).v.detach(), expected)
    assert model._module.training and model._module.transformer.h[1].attn.resid_dropout.training


def test_a_progress_bar_shows_on_long_lists_only(gpt2, capsys):
    read_contrast(gpt2.transformer.h[0], POSITIVE, NEGATIVE, batch_size=64)
    assert "Reading" not in capsys.readouterr().err
    read_contrast(gpt2.transformer.h[0], POSITIVE, NEGATIVE, batch_size=4)
    assert "Reading 14 prompts" in capsys.readouterr().err
    read_contrast(gpt2.transformer.h[0], POSITIVE, NEGATIVE, batch_size=4, progress=False)
    assert "Reading" not in capsys.readouterr().err


def test_a_bfloat16_model_gives_a_float32_vector_of_its_readings(tmp_path):
    model = load_tiny_model("gpt2", tmp_path / "bf16", layers=2, dtype=torch.bfloat16, initializer_range=0.2)
    vector = SteeringVector.from_contrast(model.transformer.h[1], POSITIVE, NEGATIVE, batch_size=5)
    assert vector.v.dtype == torch.float32
    expected = torch.stack(
        [reading_alone(model, model.transformer.h[1], p, -1) - reading_alone(model, model.transformer.h[1], n, -1) for p, n in PAIRS]
    ).mean(0)
    # bf16 readings (8 bits of mantissa) differ between a padded batch and a lone run by rounding only.
    torch.testing.assert_close(vector.v.detach(), expected, atol=1e-2, rtol=1e-2)  # entries up to ~1.4; seen 3e-3 apart


# -- applying as CAA does -------------------------------------------------------------


@pytest.fixture(scope="module")
def caa(gpt2):
    """A mean-difference vector on block 1, and steering-vectors' own vector with the same values."""
    ours = SteeringVector.from_contrast(gpt2.transformer.h[1], POSITIVE, NEGATIVE)
    theirs = steering_vectors.SteeringVector({1: ours.v.detach().clone()}, "decoder_block")
    return ours, theirs


@pytest.mark.parametrize("n", [0, 3, -1, -4, -50])
def test_steering_from_token_n_equals_steering_vectors_apply(gpt2, caa, n):
    ours, theirs = caa
    prompt, m = "The answer is (A", 4.0
    with torch.no_grad(), gpt2.trace(prompt):
        ours(alpha=m, positions=slice(n, None))
        logits = gpt2.lm_head.output.save()
    batch = gpt2.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        plain = gpt2._module(**batch).logits
        with theirs.apply(gpt2._module, multiplier=m, min_token_index=n):
            expected = gpt2._module(**batch).logits
    assert (expected - plain).abs().max() > 1e-2  # the reference does steer
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_a_negative_n_in_a_left_padded_batch_equals_steering_vectors_apply(gpt2, caa):
    """Both count a negative n from the end: of each row's prompt here, of the padded columns there, which
    left padding makes the same tokens. (A positive n differs: steering-vectors counts padded columns.)"""
    ours, theirs = caa
    prompts, m, n = ["yes", "The answer is (A", "I love this film"], 3.0, -2
    with torch.no_grad(), gpt2.trace(prompts):
        ours(alpha=m, positions=slice(n, None))
        logits = gpt2.lm_head.output.save()
    batch = gpt2.tokenizer(prompts, return_tensors="pt", padding=True)
    mask = batch.attention_mask
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # as each row alone counts its tokens
    with torch.no_grad(), theirs.apply(gpt2._module, multiplier=m, min_token_index=n):
        expected = gpt2._module(**batch, position_ids=position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-4)
    with torch.no_grad(), theirs.apply(gpt2._module, multiplier=m, min_token_index=2):
        counted_over_padding = gpt2._module(**batch, position_ids=position_ids).logits
    with torch.no_grad(), gpt2.trace(prompts):
        ours(alpha=m, positions=slice(2, None))
        by_row = gpt2.lm_head.output.save()
    assert (by_row[0, -1] - counted_over_padding[0, -1]).abs().max() > 1e-3  # "yes" is padded: positive n differs
    torch.testing.assert_close(by_row[2], counted_over_padding[2], atol=1e-5, rtol=1e-4)  # the longest row is not


def test_in_generation_a_negative_n_steers_every_new_token_as_steering_vectors_does(gpt2, caa):
    ours, theirs = caa
    prompt, m, new = "The answer is (A", 6.0, 5
    with gpt2.generate(prompt, max_new_tokens=new, do_sample=False) as tracer:
        ours(alpha=m, positions=slice(-1, None))
        ids = tracer.result.save()
    batch = gpt2.tokenizer(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=gpt2.tokenizer.eos_token_id)
    plain = gpt2._module.generate(**batch, **kwargs)
    with theirs.apply(gpt2._module, multiplier=m, min_token_index=-1):
        expected = gpt2._module.generate(**batch, **kwargs)
    assert not torch.equal(expected, plain)
    assert torch.equal(ids, expected)


def test_in_generation_steering_vectors_positive_n_never_reaches_a_new_token(gpt2, caa):
    """steering-vectors' `min_token_index=n > 0` counts inside each forward, and a decode step with a KV cache
    has one column: only the prompt is steered. The package's `positions=slice(n, None)` steers every new
    token too; `steps=0` (the prefill only) reproduces steering-vectors."""
    ours, theirs = caa
    prompt, m, new = "The answer is (A", 6.0, 5
    batch = gpt2.tokenizer(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=gpt2.tokenizer.eos_token_id)
    with theirs.apply(gpt2._module, multiplier=m, min_token_index=2):
        expected = gpt2._module.generate(**batch, **kwargs)
    with gpt2.generate(prompt, max_new_tokens=new, do_sample=False) as tracer:
        ours(alpha=m, positions=slice(2, None), steps=0)
        prefill_only = tracer.result.save()
    with gpt2.generate(prompt, max_new_tokens=new, do_sample=False) as tracer:
        ours(alpha=m, positions=slice(2, None))
        every_step = tracer.result.save()
    assert torch.equal(prefill_only, expected)
    assert not torch.equal(every_step, expected)


# -- saving ---------------------------------------------------------------------------


def test_the_vector_saves_and_loads_bit_for_bit(gpt2, tmp_path):
    vector = SteeringVector.from_contrast(gpt2.transformer.h[1], POSITIVE, NEGATIVE, method="pca_center")
    vector.save(tmp_path / "v")
    again = SteeringVector.load(tmp_path / "v", gpt2.transformer.h[1])
    assert torch.equal(again.v, vector.v) and again.v.dtype == torch.float32
    assert vector.metadata == {"method": "pca_center", "positions": -1, "pairs": len(POSITIVE)}


def test_the_metadata_round_trips(gpt2, tmp_path):
    vector = SteeringVector.from_contrast(gpt2.transformer.h[1], POSITIVE, NEGATIVE, positions=-2, method="pca")
    vector.save(tmp_path / "v")
    again = SteeringVector.load(tmp_path / "v", gpt2.transformer.h[1])
    assert getattr(again, "metadata", None) == {"method": "pca", "positions": -2, "pairs": len(POSITIVE)}


# -- bad input ------------------------------------------------------------------------


def test_lists_of_different_lengths_are_refused_naming_both(gpt2):
    with pytest.raises(ValueError, match=r"`positive` list has 3 prompts and the `negative` list 2.*same index"):
        SteeringVector.from_contrast(gpt2.transformer.h[0], ["a", "b", "c"], ["x", "y"])


@pytest.mark.parametrize("positive, negative, which", [([], [], "positive"), (["a"], [], "negative"), ([], None, "positive")])
def test_an_empty_list_is_refused(gpt2, positive, negative, which):
    with pytest.raises(ValueError, match=rf"The `{which}` list is empty.*at least one pair"):
        SteeringVector.from_contrast(gpt2.transformer.h[0], positive, negative)


def test_an_unknown_method_is_refused_naming_it_and_the_known_ones(gpt2):
    with pytest.raises(ValueError, match=r"Unknown `method='median'`.*'mean', 'pca', 'pca_diff', 'pca_center'"):
        SteeringVector.from_contrast(gpt2.transformer.h[0], ["a"], ["b"], method="median")


def test_a_prompt_too_short_for_positions_is_refused_naming_it(gpt2):
    with pytest.raises(ValueError, match=r"`positions=3`.*`negative` prompt 1 \('no'\).*2 real token\(s\).*`positions=-1`"):
        SteeringVector.from_contrast(gpt2.transformer.h[0], ["hello", "hello"], ["hello", "no"], positions=3)
    with pytest.raises(ValueError, match=r"`positions=-4`.*`positive` prompt 0 \('abc'\)"):
        SteeringVector.from_contrast(gpt2.transformer.h[0], ["abc"], ["hello"], positions=-4)


def test_wrong_types_are_refused_with_what_to_pass(gpt2):
    h0 = gpt2.transformer.h[0]
    with pytest.raises(TypeError, match=r"`positive` must be a list of prompts, got one string.*\['yes'\]"):
        SteeringVector.from_contrast(h0, "yes", ["no"])
    with pytest.raises(TypeError, match=r"needs nnsight Envoys.*got Linear"):
        SteeringVector.from_contrast(torch.nn.Linear(2, 2), ["a"], ["b"])
    with pytest.raises(ValueError, match=r"empty list of modules"):
        SteeringVector.from_contrast([], ["a"], ["b"])
    with pytest.raises(TypeError, match=r"`positions` is the one token.*got slice"):
        SteeringVector.from_contrast(h0, ["a"], ["b"], positions=slice(-1, None))
    with pytest.raises(ValueError, match=r"`batch_size`.*positive int; got 0"):
        SteeringVector.from_contrast(h0, ["a"], ["b"], batch_size=0)
    with pytest.raises(TypeError, match=r"`negative` prompts must be strings; item 0 is 3"):
        SteeringVector.from_contrast(h0, ["a"], [3])
    with pytest.raises(TypeError, match=r"list of `\(positive, negative\)` string pairs; item 0 is 'ab'"):
        SteeringVector.from_contrast(h0, ["ab"])


def test_directions_that_do_not_exist_are_refused(gpt2):
    with pytest.raises(ValueError, match=r"`method='pca_diff'`.*one pair never has one.*`method='mean'`"):
        SteeringVector.from_contrast(gpt2.transformer.h[0], ["yes"], ["no"], method="pca_diff")
    with pytest.raises(ValueError, match=r"every positive reading equals its negative"):
        SteeringVector.from_contrast(gpt2.transformer.h[0], ["same", "also"], ["same", "also"], method="pca")
    zero = SteeringVector.from_contrast(gpt2.transformer.h[0], ["same"], ["same"], method="mean")  # honest: no difference
    assert not bool(zero.v.any())
