"""Distributed alignment search: `RotatedSpace` and its masked kin, against pyvene 0.1.8 and a plain hook.

Two independent references:

- pyvene's own interventions (``RotatedSpaceIntervention`` & co.), called by a
  plain torch forward hook on the raw Hugging Face module, on the paired rows
  and tokens: logits and gradients must match ours with pyvene's rotation
  loaded into ours;
- a forward hook that writes ``h_b + R_k^T (R_k h_s - R_k h_b)`` itself, finding
  each row's real tokens from the attention mask: the pairing of rows and
  positions (padding, broadcasting, several positions) must match it.

Neither shares code with the package.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from nnsight_toolbox import BatchedNNsight, BoundlessRotatedSpace, RotatedSpace, SigmoidMaskRotatedSpace

pyvene = pytest.importorskip("pyvene.models.interventions", reason="the reference needs pyvene (tests/references.txt)")

LAYER = "transformer.h.1"
SOURCE = ["The Eiffel Tower is in", "Rome is"]  # lengths differ: padding on both sides of the pair
BASE = ["Big Ben is in the city of", "Madrid is in"]
D = 32


def batch_of(model, prompts):
    return model.tokenizer(prompts, return_tensors="pt", padding=True)


def forward_batch(model, prompts):
    """The padded batch as nnsight runs it: left-padded rows count their positions from their first real token."""
    batch = dict(batch_of(model, prompts))
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def real_columns(mask: torch.Tensor, row: int, positions) -> list[int]:
    """The columns of ``row``'s real tokens at ``positions`` (counted over its real tokens)."""
    real = mask[row].nonzero().flatten().tolist()
    return [real[p] for p in positions]


@contextlib.contextmanager
def pair_hook(model, mask, pairs, formula):
    """A hook on the raw layer: for each (base row, base cols, source row, source cols), base <- formula(base, source)."""
    module = model._module.get_submodule(LAYER)

    def hook(mod, args, kwargs, output):
        out = output.clone()
        for b_row, b_cols, s_row, s_cols in pairs:
            hb = output[b_row, b_cols]  # (n, d)
            hs = output[s_row, s_cols].expand_as(hb)
            out[b_row, b_cols] = formula(hb, hs)
        return out

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def pairs_for(mask, n_source, source_positions, base_positions, base_rows=None):
    """Row i of the base (rows n_source..) with row i of the source (or row 0 if the source has one)."""
    total = mask.shape[0]
    rows = range(n_source, total) if base_rows is None else base_rows
    out = []
    for i, b in enumerate(rows):
        s = i if n_source > 1 else 0
        out.append((b, real_columns(mask, b, base_positions), s, real_columns(mask, s, source_positions)))
    return out


def swap_formula(R: torch.Tensor, k: int):
    Rk = R[:k].detach()  # (k, d): the first k rows

    def formula(hb, hs):
        return hb + (hs @ Rk.T - hb @ Rk.T) @ Rk

    return formula


def trace_swap(model, das, source_positions, base_positions, source=SOURCE, base=BASE):
    with model.trace() as tracer:
        with tracer.invoke(source):
            src = das.source(positions=source_positions)
            src_logits = model.lm_head.output.save()
        with tracer.invoke(base):
            das(src, positions=base_positions)
            logits = model.lm_head.output.save()
    return src_logits, logits


def hf_logits_with(model, prompts):
    batch = forward_batch(model, prompts)
    return model._module(**batch).logits, batch["attention_mask"]


def randomized_rotation(das, seed=0, scale=0.3):
    """Move R off its init, the way training does: a non-zero generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        das.rotate_layer.generator.copy_(torch.randn(das.rotate_layer.generator.shape, generator=generator) * scale)
    return das


# ---------------------------------------------------------------------------
# Pairing rows and tokens, against a hook that writes the formula itself
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source_positions, base_positions",
    [(-1, -1), ([0, -1], [1, -2]), (-1, [0, 2, -1])],  # one each; several in token order; one source token to each base token
    ids=["last-last", "two-two", "one-to-three"],
)
def test_swap_pairs_rows_and_tokens_as_a_hook_does(gpt2, source_positions, base_positions):
    das = randomized_rotation(RotatedSpace(gpt2.transformer.h[1], k=8))
    src_logits, logits = trace_swap(gpt2, das, source_positions, base_positions)
    s_pos = [source_positions] if isinstance(source_positions, int) else source_positions
    b_pos = [base_positions] if isinstance(base_positions, int) else base_positions
    with torch.no_grad():
        plain, mask = hf_logits_with(gpt2, SOURCE + BASE)
        with pair_hook(gpt2, mask, pairs_for(mask, 2, s_pos, b_pos), swap_formula(das.R, 8)):
            expected, _ = hf_logits_with(gpt2, SOURCE + BASE)
    assert not torch.allclose(expected[2:], plain[2:], atol=1e-3)  # the swap changes the base
    torch.testing.assert_close(logits, expected[2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(src_logits, plain[:2], atol=1e-5, rtol=1e-5)  # the source runs as it is


def test_one_source_row_goes_to_every_base_row(gpt2):
    das = randomized_rotation(RotatedSpace(gpt2.transformer.h[1], k=4))
    _, logits = trace_swap(gpt2, das, -1, -1, source=SOURCE[:1])
    with torch.no_grad():
        _, mask = hf_logits_with(gpt2, SOURCE[:1] + BASE)
        with pair_hook(gpt2, mask, pairs_for(mask, 1, [-1], [-1]), swap_formula(das.R, 4)):
            expected, _ = hf_logits_with(gpt2, SOURCE[:1] + BASE)
    torch.testing.assert_close(logits, expected[1:], atol=1e-5, rtol=1e-5)


def test_base_before_source_and_a_third_untouched_invoke(gpt2):
    """Rows are found by invoke, wherever they sit in the batch; an invoke with no swap runs as it is."""
    das = randomized_rotation(RotatedSpace(gpt2.transformer.h[1], k=8))
    others = ["Hello there"]
    with gpt2.trace() as tracer:
        with tracer.invoke(others):
            other = gpt2.lm_head.output.save()
        with tracer.invoke(SOURCE):
            src = das.source(positions=-1)
        with tracer.invoke(BASE):
            das(src, positions=0)
            logits = gpt2.lm_head.output.save()
    prompts = others + SOURCE + BASE
    with torch.no_grad():
        plain, mask = hf_logits_with(gpt2, prompts)
        pairs = [(3 + i, real_columns(mask, 3 + i, [0]), 1 + i, real_columns(mask, 1 + i, [-1])) for i in range(2)]
        with pair_hook(gpt2, mask, pairs, swap_formula(das.R, 8)):
            expected, _ = hf_logits_with(gpt2, prompts)
    torch.testing.assert_close(logits, expected[3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other, plain[:1], atol=1e-5, rtol=1e-5)


def test_two_pairs_in_one_batch_each_swap_their_own_rows(gpt2):
    """One intervention, two source/base pairs in one batch: each base pairs with its own source."""
    das = randomized_rotation(RotatedSpace(gpt2.transformer.h[1], k=8))
    s1, b1, s2, b2 = ["ab", "cdef"], ["ghi", "jk"], ["lmnop"], ["qr", "stuvw"]
    with gpt2.trace() as tracer:
        with tracer.invoke(s1):
            first = das.source(positions=-1)
        with tracer.invoke(b1):
            das(first, positions=-1)
            a = gpt2.lm_head.output.save()
        with tracer.invoke(s2):
            second = das.source(positions=0)
        with tracer.invoke(b2):
            das(second, positions=-1)
            b = gpt2.lm_head.output.save()
    prompts = s1 + b1 + s2 + b2
    with torch.no_grad():
        _, mask = hf_logits_with(gpt2, prompts)
        pairs = [(b_row, real_columns(mask, b_row, [-1]), s_row, real_columns(mask, s_row, [p])) for b_row, s_row, p in [(2, 0, -1), (3, 1, -1), (5, 4, 0), (6, 4, 0)]]
        with pair_hook(gpt2, mask, pairs, swap_formula(das.R, 8)):
            expected, _ = hf_logits_with(gpt2, prompts)
    torch.testing.assert_close(a, expected[2:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, expected[5:7], atol=1e-5, rtol=1e-5)


def test_a_saved_source_tensor_from_an_earlier_trace(gpt2):
    das = randomized_rotation(RotatedSpace(gpt2.transformer.h[1], k=8))
    with gpt2.trace(SOURCE[:1]):
        h = gpt2.transformer.h[1].output[:, -1:].save()  # (1, 1, d)
    with gpt2.trace(BASE):
        das(h, positions=-1)
        logits = gpt2.lm_head.output.save()
    with torch.no_grad():
        _, mask = hf_logits_with(gpt2, SOURCE[:1] + BASE)
        with pair_hook(gpt2, mask, pairs_for(mask, 1, [-1], [-1]), swap_formula(das.R, 8)):
            expected, _ = hf_logits_with(gpt2, SOURCE[:1] + BASE)
    # The lone source ran unpadded in its own trace, padded on the left in the reference's batch:
    # the values agree to float rounding, not bit for bit.
    torch.testing.assert_close(logits, expected[1:], atol=1e-4, rtol=1e-4)


def test_alpha_zero_changes_nothing_and_k_equal_d_swaps_the_whole_state(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=D)
    with gpt2.trace() as tracer:
        with tracer.invoke(SOURCE):
            src = das.source(positions=-1)
            hs = gpt2.transformer.h[1].output[:, -1].save()
        with tracer.invoke(BASE):
            das(src, positions=-1)
            hb = gpt2.transformer.h[1].output[:, -1].save()
    torch.testing.assert_close(hb, hs, atol=1e-5, rtol=1e-5)  # R^T R = I: the whole state is the source's
    _, logits = trace_swap(gpt2, randomized_rotation(RotatedSpace(gpt2.transformer.h[1], k=8)), -1, -1)
    with gpt2.trace() as tracer:
        with tracer.invoke(SOURCE):
            src = das.source(positions=-1)
        with tracer.invoke(BASE):
            das(src, alpha=0.0, positions=-1)
            untouched = gpt2.lm_head.output.save()
    with torch.no_grad():
        plain, _ = hf_logits_with(gpt2, SOURCE + BASE)
    torch.testing.assert_close(untouched, plain[2:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, plain[2:], atol=1e-3)


# ---------------------------------------------------------------------------
# Against pyvene 0.1.8: same rotation, same logits and gradients
# ---------------------------------------------------------------------------


def pyvene_pair(cls_name, seed=1):
    """A pyvene intervention of width D whose rotation is off its init (as after training)."""
    cls = getattr(pyvene, cls_name)
    torch.manual_seed(seed)
    reference = cls(embed_dim=D)
    with torch.no_grad():
        reference.rotate_layer.parametrizations.weight.original.add_(torch.randn(D, D) * 0.3)
    if cls_name == "RotatedSpaceIntervention":
        reference.set_interchange_dim(8)
    if cls_name == "BoundlessRotatedSpaceIntervention":
        with torch.no_grad():
            reference.intervention_boundaries.fill_(0.3)
            reference.temperature.fill_(2.0)
    if cls_name == "SigmoidMaskRotatedSpaceIntervention":
        with torch.no_grad():
            reference.masks.copy_(torch.randn(D) * 3)
            reference.temperature.fill_(2.0)
    return reference


OURS = {
    "RotatedSpaceIntervention": lambda m: RotatedSpace(m, k=8),
    "BoundlessRotatedSpaceIntervention": BoundlessRotatedSpace,
    "SigmoidMaskRotatedSpaceIntervention": SigmoidMaskRotatedSpace,
}


@pytest.mark.parametrize("cls_name", sorted(OURS))
def test_equals_pyvene_in_logits_and_gradients(gpt2, cls_name):
    reference = pyvene_pair(cls_name)
    das = OURS[cls_name](gpt2.transformer.h[1])
    das.load_state_dict(reference.state_dict())
    assert torch.equal(das.R, reference.rotate_layer.weight.T)  # the same parametrisation, evaluated the same way
    targets = torch.tensor([5, 7])

    _, logits = trace_swap(gpt2, das, -1, -1)
    loss = torch.nn.functional.cross_entropy(logits[:, -1], targets)
    loss.backward()

    _, mask = hf_logits_with(gpt2, SOURCE + BASE)

    def formula(hb, hs):
        return reference(hb, hs)  # pyvene's forward on (n, d) base and source

    with pair_hook(gpt2, mask, pairs_for(mask, 2, [-1], [-1]), formula):
        expected, _ = hf_logits_with(gpt2, SOURCE + BASE)
    # pyvene's logits are those of the whole padded batch; ours at the base rows.
    expected_loss = torch.nn.functional.cross_entropy(expected[2:, -1], targets)
    expected_loss.backward()
    torch.testing.assert_close(logits, expected[2:].detach(), atol=1e-5, rtol=1e-5)
    original = reference.rotate_layer.parametrizations.weight.original
    torch.testing.assert_close(das.rotate_layer.generator.grad, original.grad, atol=1e-5, rtol=1e-4)
    assert das.rotate_layer.generator.grad.abs().sum() > 0
    if cls_name == "BoundlessRotatedSpaceIntervention":
        assert das.temperature == 2.0
        torch.testing.assert_close(das.beta.grad, reference.intervention_boundaries.grad, atol=1e-6, rtol=1e-4)
        assert das.beta.grad.abs().sum() > 0
    if cls_name == "SigmoidMaskRotatedSpaceIntervention":
        torch.testing.assert_close(das.masks.grad, reference.masks.grad, atol=1e-6, rtol=1e-4)


def test_rotated_space_equals_pyvene_on_raw_tensors():
    """The formula alone, several shapes: pyvene's with interchange_dim set, and the brief's identity."""
    from nnsight_toolbox.testing import load_tiny_model

    model = load_tiny_model("gpt2")
    for k in (1, 5, D):
        reference = pyvene_pair("RotatedSpaceIntervention", seed=k)
        reference.set_interchange_dim(k)
        das = RotatedSpace(model.transformer.h[1], k=k)
        das.load_state_dict(reference.state_dict())
        hb, hs = torch.randn(4, 3, D), torch.randn(4, 3, D)
        torch.testing.assert_close(das.swap(hb, hs), reference(hb.clone(), hs), atol=1e-5, rtol=1e-5)


def test_pyvene_interchange_dim_must_equal_k(gpt2):
    reference = pyvene_pair("RotatedSpaceIntervention")  # interchange_dim 8
    with pytest.raises(ValueError, match=r"`interchange_dim` is 8.*k=4.*RotatedSpace\(module, k=8\)"):
        RotatedSpace(gpt2.transformer.h[1], k=4).load_state_dict(reference.state_dict())
    fresh = pyvene.RotatedSpaceIntervention(embed_dim=D, interchange_dim=8)  # pyvene ignores it: interchange_dim stays D
    with pytest.raises(ValueError, match="`interchange_dim` is 32"):
        RotatedSpace(gpt2.transformer.h[1], k=8).load_state_dict(fresh.state_dict())


# ---------------------------------------------------------------------------
# State: round trips bit for bit; R stays orthogonal through AdamW with weight decay
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda m: RotatedSpace(m, k=8), BoundlessRotatedSpace, SigmoidMaskRotatedSpace], ids=["rotated", "boundless", "sigmoid"])
def test_state_dict_round_trips_bit_for_bit(gpt2, make):
    das = randomized_rotation(make(gpt2.transformer.h[1]))
    if hasattr(das, "temperature"):
        das.temperature = 0.1  # not exact in float32: it must come back as the same Python float
    with torch.no_grad():
        for name, p in das.named_parameters():
            if name != "rotate_layer.generator":
                p.add_(0.125)
    state = das.state_dict()
    other = make(gpt2.transformer.h[1])
    params = list(other.parameters())
    assert other.load_state_dict(state) is None
    assert all(a is b for a, b in zip(params, other.parameters()))  # an optimizer holding them keeps working
    again = other.state_dict()
    assert list(again) == list(state)
    for key in state:
        assert torch.equal(again[key], state[key]), key
    assert torch.equal(other.R, das.R)
    if hasattr(das, "temperature"):
        assert other.temperature == 0.1
    hb, hs = torch.randn(2, D), torch.randn(2, D)
    assert torch.equal(other.swap(hb, hs), das.swap(hb, hs))


@pytest.mark.slow  # a training loop
def test_r_stays_orthogonal_under_adamw_with_weight_decay(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    optimizer = torch.optim.AdamW(das.parameters(), lr=0.05, weight_decay=0.5)
    start = das.R.detach().clone()
    targets = torch.tensor([3, 9])
    for _ in range(15):
        _, logits = trace_swap(gpt2, das, -1, -1)
        loss = torch.nn.functional.cross_entropy(logits[:, -1], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    R = das.R.detach()
    assert (R - start).abs().max() > 1e-2  # it trained
    torch.testing.assert_close(R @ R.T, torch.eye(D), atol=1e-5, rtol=0)


def test_state_dict_refuses_wrong_keys_and_shapes(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    with pytest.raises(KeyError, match="missing \\['rotate_layer'\\]"):
        das.load_state_dict({"R": torch.eye(D)})
    with pytest.raises(ValueError, match=r"`rotate_layer` has shape \(16, 16\).*needs \(32, 32\)"):
        das.load_state_dict({"rotate_layer": torch.eye(16)})
    before = das.R.detach().clone()
    with pytest.raises(KeyError, match="missing \\['beta'"):
        BoundlessRotatedSpace(gpt2.transformer.h[1]).load_state_dict(das.state_dict())
    assert torch.equal(das.R, before)


# ---------------------------------------------------------------------------
# generate: the swap acts on the passes steps= chooses
# ---------------------------------------------------------------------------


@pytest.mark.slow  # a generate loop
def test_generate_swaps_at_the_prefill_with_steps_zero(gpt2):
    das = randomized_rotation(RotatedSpace(gpt2.transformer.h[1], k=16), scale=1.0)
    with gpt2.generate(max_new_tokens=4, do_sample=False) as tracer:
        with tracer.invoke(SOURCE):
            src = das.source(positions=-1)
        with tracer.invoke(BASE):
            das(src, positions=-1, steps=0)
        with tracer.invoke():
            ids = tracer.result.save()
    batch = batch_of(gpt2, SOURCE + BASE)
    mask = batch["attention_mask"]
    calls = []
    formula = swap_formula(das.R, 16)
    module = gpt2._module.get_submodule(LAYER)

    def hook(mod, args, kwargs, output):
        calls.append(output.shape[1])
        if len(calls) > 1:
            return output  # the prefill only
        out = output.clone()
        for b_row, b_cols, s_row, s_cols in pairs_for(mask, 2, [-1], [-1]):
            out[b_row, b_cols] = formula(output[b_row, b_cols], output[s_row, s_cols])
        return out

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            expected = gpt2._module.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=gpt2.tokenizer.eos_token_id)
    finally:
        handle.remove()
    with torch.no_grad():
        plain = gpt2._module.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=gpt2.tokenizer.eos_token_id)
    assert torch.equal(ids, expected)
    assert not torch.equal(expected[2:], plain[2:])  # the swap changed what the base generates


def test_generate_refuses_a_step_whose_source_tokens_are_behind(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    with pytest.raises(ValueError, match=r"source's\s+`positions=-1` holds none of them.*`steps=0`"):
        with gpt2.generate(max_new_tokens=3, do_sample=False) as tracer:
            with tracer.invoke(SOURCE):
                src = das.source(positions=-1)
            with tracer.invoke(BASE):
                das(src, positions=slice(-1, None))


# ---------------------------------------------------------------------------
# A module with no token axis: whole rows (a small MLP through `BatchedNNsight`)
# ---------------------------------------------------------------------------


def small_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def test_rows_of_an_mlp_swap_whole_and_train():
    net = small_mlp()
    model = BatchedNNsight(net)
    das = randomized_rotation(RotatedSpace(model[1], k=5, output_dim=16))
    xs, xb = torch.randn(4, 6), torch.randn(4, 6)
    with model.trace() as tracer:
        with tracer.invoke(xs):
            src = das.source()
        with tracer.invoke(xb):
            das(src)
            out = model.output.save()
    out.sum().backward()
    assert das.rotate_layer.generator.grad.abs().sum() > 0
    R = das.R.detach()
    with torch.no_grad():
        hs, hb = net[1](net[0](xs)), net[1](net[0](xb))
        h = hb + (hs @ R[:5].T - hb @ R[:5].T) @ R[:5]
        expected = net[4](net[3](net[2](h)))
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)
    with model.trace() as tracer:  # one source row to every base row
        with tracer.invoke(xs[:1]):
            src = das.source()
        with tracer.invoke(xb):
            das(src)
            out = model.output.save()
    with torch.no_grad():
        h = hb + (hs[:1] @ R[:5].T - hb @ R[:5].T) @ R[:5]
        torch.testing.assert_close(out, net[4](net[3](net[2](h))), atol=1e-5, rtol=1e-5)


def test_batched_nnsight_refuses_what_it_cannot_batch():
    model = BatchedNNsight(small_mlp())
    with pytest.raises(ValueError, match="same arguments"):
        with model.trace() as tracer:
            with tracer.invoke(torch.zeros(1, 6)):
                pass
            with tracer.invoke(torch.zeros(1, 6), torch.zeros(1, 6)):
                pass


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k, error, match", [(0, ValueError, r"1\.\.32"), (33, ValueError, "k=33"), (2.0, TypeError, "int"), (True, TypeError, "int")])
def test_k_must_be_an_int_in_range(gpt2, k, error, match):
    with pytest.raises(error, match=f"`k`.*{match}"):
        RotatedSpace(gpt2.transformer.h[1], k=k)


def test_a_raw_torch_module_is_a_type_error():
    with pytest.raises(TypeError, match="Envoy"):
        RotatedSpace(torch.nn.Linear(4, 4), k=2)


def test_a_call_with_no_source(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    with pytest.raises(TypeError, match=r"needs a source.*\.source\(positions="):
        with gpt2.trace("Hello"):
            das(positions=-1)


def test_position_counts_that_differ(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    with pytest.raises(ValueError, match=r"picks 2 token\(s\) per row and the base's\s+`positions=\[0, 1, -1\]` 3"):
        trace_swap(gpt2, das, [0, -1], [0, 1, -1])


def test_rows_that_do_not_pair(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    with pytest.raises(ValueError, match="source invoke has 2 rows and this one 3"):
        trace_swap(gpt2, das, -1, -1, base=BASE + ["Hello"])


def test_a_source_read_on_another_module(gpt2):
    other = RotatedSpace(gpt2.transformer.h[0], k=8)
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    with pytest.raises(ValueError, match=r"`model\.transformer\.h\.1` was given a source read on `model\.transformer\.h\.0`"):
        with gpt2.trace() as tracer:
            with tracer.invoke(SOURCE):
                src = other.source(positions=-1)
            with tracer.invoke(BASE):
                das(src, positions=-1)


def test_a_source_handle_from_another_trace(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    kept = []  # a handle kept past its trace (a list the trace appends to)
    with gpt2.trace() as tracer:
        with tracer.invoke(SOURCE):
            kept.append(das.source(positions=-1))
        with tracer.invoke(BASE):
            pass
    assert len(kept) == 1
    with pytest.raises(ValueError, match="source read in another trace"):
        with gpt2.trace(BASE):
            das(kept[0], positions=-1)


def test_source_tensors_of_the_wrong_shape(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    with pytest.raises(ValueError, match=r"last dimension must be the module's width 32"):
        with gpt2.trace(BASE):
            das(torch.zeros(2, 1, 16), positions=-1)
    with pytest.raises(ValueError, match=r"shape \(3, 1, 32\).*\(2, 1, 32\) \(rows, positions, d\)"):
        with gpt2.trace(BASE):
            das(torch.zeros(3, 1, D), positions=-1)


def test_positions_on_a_module_with_no_token_axis():
    model = BatchedNNsight(small_mlp())
    das = RotatedSpace(model[1], k=5, output_dim=16)
    with pytest.raises(ValueError, match=r"no token axis.*Drop `positions=`"):
        with model.trace() as tracer:
            with tracer.invoke(torch.randn(2, 6)):
                src = das.source()
            with tracer.invoke(torch.randn(2, 6)):
                das(src, positions=0)


def test_the_swap_is_not_an_output_formula(gpt2):
    das = RotatedSpace(gpt2.transformer.h[1], k=8)
    with pytest.raises(TypeError, match="no formula of the output alone"):
        das.intervene(torch.zeros(1, 2, D), None, 1.0)


def test_temperature_is_a_positive_float(gpt2):
    das = BoundlessRotatedSpace(gpt2.transformer.h[1])
    assert das.temperature == 50.0 and isinstance(das.temperature, float)
    assert "temperature" not in dict(das.named_parameters())  # set on a schedule, never trained
    with pytest.raises(ValueError, match="finite positive"):
        das.temperature = 0
    assert das.temperature == 50.0


def test_gradients_reach_a_source_tensor_and_the_rotation(gpt2):
    das = randomized_rotation(RotatedSpace(gpt2.transformer.h[1], k=8))
    source = torch.randn(1, 1, D, requires_grad=True)
    with gpt2.trace(BASE):
        das(source, positions=-1)
        logits = gpt2.lm_head.output.save()
    logits[:, -1].logsumexp(-1).sum().backward()
    assert source.grad is not None and source.grad.abs().sum() > 0
    assert das.rotate_layer.generator.grad.abs().sum() > 0
    # Only the k=8 rotated coordinates of the source reach the model: the gradient lies in R_k's row space.
    R = das.R.detach()
    grad = source.grad.flatten()
    torch.testing.assert_close((grad @ R.T)[8:], torch.zeros(D - 8), atol=1e-6, rtol=0)


@pytest.mark.parametrize("build", [
    lambda m: RotatedSpace(m.transformer.h[1], k=5),
    lambda m: BoundlessRotatedSpace(m.transformer.h[1]),
    lambda m: SigmoidMaskRotatedSpace(m.transformer.h[1]),
], ids=["RotatedSpace", "BoundlessRotatedSpace", "SigmoidMaskRotatedSpace"])
def test_a_trained_swap_saves_and_loads_bit_for_bit_alone_and_in_a_set(gpt2, tmp_path, build):
    """The one format saves R materialised with the kind's own tensors (beta, the temperature, the masks)."""
    from nnsight_toolbox import InterventionSet, LORA

    das = build(gpt2)
    optimizer = torch.optim.AdamW(das.parameters(), lr=1e-2)
    for _ in range(3):  # train a little: the generator moves off zero, so R is no longer the saved base
        optimizer.zero_grad()
        das.swap(torch.randn(4, 32), torch.randn(4, 32)).square().sum().backward()
        optimizer.step()
    if hasattr(das, "temperature"):
        das.temperature = 0.1
    das.save(tmp_path / "one")
    back = type(das).load(tmp_path / "one", gpt2.transformer.h[1])
    InterventionSet([das, LORA(gpt2.transformer.h[0].mlp.c_fc, r=2)]).save(tmp_path / "mix")
    in_set = InterventionSet.load(tmp_path / "mix", gpt2)[0]
    for loaded in (back, in_set):
        assert type(loaded) is type(das) and loaded.config() == das.config()
        for key, value in das.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert torch.equal(loaded.R, das.R)
        hb, hs = torch.randn(3, 32), torch.randn(3, 32)
        assert torch.equal(loaded.swap(hb, hs), das.swap(hb, hs))
