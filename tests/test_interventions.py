"""`SteeringVector`, `LoReFT` and `DiReFT` against independent references.

Each reference is a plain torch forward hook on the raw Hugging Face module
computing the formula from its own tensors, at the positions and rows
tests/position_reference.py picks from the attention mask. For LoReFT and
DiReFT the formula is pyreft's: the classes below are rebuilt line for line
from ``pyreft/interventions.py`` (pyreft 0.1.0; pyreft itself pins an old
transformers, so it is not installed), including its default Householder
orthogonal parametrization and its ``state_dict``/``load_state_dict``.
"""

from collections import OrderedDict

import pytest
import torch
from position_reference import EVERY, left_padded, positioned_hook, raw_generate, raw_logits

from nnsight_toolbox import DiReFT, LoReFT, SteeringVector

PROMPTS = ["The Eiffel Tower is in", "Hi", "Paris is the capital"]
LAYER = "transformer.h.1"  # a block: its output is a tensor under transformers 5
ATTN = "transformer.h.0.attn"  # its output is a tuple (out, weights)


# -- pyreft's formulas, rebuilt from pyreft/interventions.py (0.1.0) -----------------------------


class PyreftRotate(torch.nn.Module):
    """pyreft's LowRankRotateLayer."""

    def __init__(self, n, m):
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(torch.empty(n, m), requires_grad=True)
        torch.nn.init.orthogonal_(self.weight)

    def forward(self, x):
        return torch.matmul(x.to(self.weight.dtype), self.weight)


class PyreftLoreft(torch.nn.Module):
    """pyreft's LoreftIntervention (dropout 0, linear act_fn), float32."""

    def __init__(self, embed_dim, r):
        torch.nn.Module.__init__(self)
        self.rotate_layer = torch.nn.utils.parametrizations.orthogonal(PyreftRotate(embed_dim, r))
        self.learned_source = torch.nn.Linear(embed_dim, r)
        self.embed_dim = embed_dim

    def forward(self, base):
        rotated_base = self.rotate_layer(base)
        return base + torch.matmul((self.learned_source(base) - rotated_base), self.rotate_layer.weight.T)

    def state_dict(self, *args, **kwargs):
        state_dict = OrderedDict()
        for k, v in self.learned_source.state_dict().items():
            state_dict[k] = v
        state_dict["rotate_layer"] = self.rotate_layer.weight.data
        return state_dict

    def load_state_dict(self, state_dict, *args, **kwargs):
        self.learned_source.load_state_dict(state_dict, strict=False)
        overload_w = state_dict["rotate_layer"]
        width = overload_w.shape[-1]
        self.rotate_layer = torch.nn.utils.parametrizations.orthogonal(PyreftRotate(self.embed_dim, width))
        self.rotate_layer.parametrizations.weight[0].base[:, :width] = overload_w
        assert torch.allclose(self.rotate_layer.weight.data, overload_w.data)


class PyreftDireft(PyreftLoreft):
    """pyreft's DireftIntervention."""

    def forward(self, base):
        cast_base = base.to(self.learned_source.weight.dtype)
        return base + torch.matmul(self.learned_source(cast_base).to(self.rotate_layer.weight.dtype), self.rotate_layer.weight.T)


def pyreft_twin(cls, seed=0, d=32, r=4):
    """A pyreft intervention with random (non-trivial) weights, and ours loaded from its state_dict."""
    torch.manual_seed(seed)
    twin = (PyreftLoreft if cls is LoReFT else PyreftDireft)(d, r)
    with torch.no_grad():
        twin.learned_source.weight.mul_(8.0)
        twin.learned_source.bias.normal_(0, 2.0)
    return twin


def built(gpt2, cls, path=LAYER, seed=0):
    """Ours with non-trivial weights, and the reference formula ``(h, x) -> h'`` on its own copies."""
    module = gpt2.get(path)
    if cls is SteeringVector:
        ours = SteeringVector(module)
        with torch.no_grad():
            ours.v.copy_(torch.randn(32, generator=torch.Generator().manual_seed(seed)) * 3.0)
        v = ours.v.detach().clone()
        return ours, lambda h, x: h + v
    twin = pyreft_twin(cls, seed)
    ours = cls(module, r=4)
    ours.load_state_dict(twin.state_dict())
    return ours, lambda h, x: twin(h)


KINDS = [SteeringVector, LoReFT, DiReFT]


@pytest.mark.slow  # a grid of kinds x positions
@pytest.mark.parametrize("positions", [None, [0, 1, -2, -1]], ids=repr)
@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_trace_logits_equal_the_reference(gpt2, cls, positions):
    ours, formula = built(gpt2, cls)
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.trace(PROMPTS):
        ours(positions=positions)
        logits = gpt2.lm_head.output.save()
    spec = EVERY if positions is None else positions
    with torch.no_grad():
        with positioned_hook(gpt2._module.get_submodule(LAYER), formula, batch["attention_mask"], [spec] * 3):
            expected = raw_logits(gpt2, batch)
        base = raw_logits(gpt2, batch)
    real = batch["attention_mask"].bool()
    assert not torch.allclose(expected[real], base[real], atol=1e-3), "the intervention should change the logits"
    torch.testing.assert_close(logits[real], expected[real])


@pytest.mark.slow
@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_only_the_invoke_that_called_it_is_changed(gpt2, cls):
    ours, formula = built(gpt2, cls)
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.trace() as tracer:
        with tracer.invoke(PROMPTS[:2]):
            ours(positions=-1)
        with tracer.invoke(PROMPTS[2:]):
            pass
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    with torch.no_grad(), positioned_hook(gpt2._module.get_submodule(LAYER), formula, batch["attention_mask"], [-1, -1, None]):
        expected = raw_logits(gpt2, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real])


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_a_tuple_output_is_changed_in_its_first_element(gpt2, cls):
    ours, formula = built(gpt2, cls, path=ATTN)
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.trace(PROMPTS):
        ours(alpha=1.0, positions=slice(-1, None))
        logits = gpt2.lm_head.output.save()
    with torch.no_grad(), positioned_hook(gpt2._module.get_submodule(ATTN), formula, batch["attention_mask"], [slice(-1, None)] * 3):
        expected = raw_logits(gpt2, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real])


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_alpha_scales_the_edit(gpt2, cls):
    ours, formula = built(gpt2, cls)
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.trace(PROMPTS):
        ours(alpha=0.5)
        logits = gpt2.lm_head.output.save()
    half = lambda h, x: h + 0.5 * (formula(h, x) - h)  # noqa: E731
    with torch.no_grad(), positioned_hook(gpt2._module.get_submodule(LAYER), half, batch["attention_mask"], [EVERY] * 3):
        expected = raw_logits(gpt2, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real])


def reference_parameters(cls, ours):
    """Leaf copies of ours' parameters, and the formula computed from them (so their gradients can be compared)."""
    if cls is SteeringVector:
        v = ours.v.detach().clone().requires_grad_()
        return {"v": v}, lambda h, x: h + v
    Rt = ours.rotate_layer.weight.detach().clone().requires_grad_()  # R^T (d, r)
    W, b = ours.learned_source.weight.detach().clone().requires_grad_(), ours.learned_source.bias.detach().clone().requires_grad_()
    if cls is LoReFT:
        return {"rotate_layer": Rt, "weight": W, "bias": b}, lambda h, x: h + (h @ W.T + b - h @ Rt) @ Rt.T
    return {"rotate_layer": Rt, "weight": W, "bias": b}, lambda h, x: h + (h @ W.T + b) @ Rt.T


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_gradients_equal_the_reference(gpt2, cls):
    ours, _ = built(gpt2, cls)
    batch = left_padded(gpt2, PROMPTS)
    real = batch["attention_mask"].bool()
    weights = torch.randn(int(real.sum()), 257, generator=torch.Generator().manual_seed(1))
    with gpt2.trace(PROMPTS):
        ours(positions=[0, -1])
        logits = gpt2.lm_head.output.save()
    (logits[real] * weights).sum().backward()

    leaves, formula = reference_parameters(cls, ours)
    with positioned_hook(gpt2._module.get_submodule(LAYER), formula, batch["attention_mask"], [[0, -1]] * 3):
        (raw_logits(gpt2, batch)[real] * weights).sum().backward()
    if cls is SteeringVector:
        torch.testing.assert_close(ours.v.grad, leaves["v"].grad)
        return
    torch.testing.assert_close(ours.learned_source.weight.grad, leaves["weight"].grad)
    torch.testing.assert_close(ours.learned_source.bias.grad, leaves["bias"].grad)
    # R's trainable tensor is its generator: compare the gradient that reaches R^T
    # itself, carried to the generator by the same chain rule torch applies.
    Rt = ours.rotate_layer.weight
    (expected_generator_grad,) = torch.autograd.grad(Rt, ours.rotate_layer.generator, leaves["rotate_layer"].grad)
    torch.testing.assert_close(ours.rotate_layer.generator.grad, expected_generator_grad)


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_greedy_generation_equals_the_reference(gpt2, cls):
    ours, formula = built(gpt2, cls, seed=2)
    batch = left_padded(gpt2, PROMPTS)
    with gpt2.generate(PROMPTS, max_new_tokens=6, do_sample=False) as tracer:
        ours(positions=slice(-1, None))
        ids = tracer.result.save()
    with torch.no_grad(), positioned_hook(gpt2._module.get_submodule(LAYER), formula, batch["attention_mask"], [slice(-1, None)] * 3):
        expected = raw_generate(gpt2, batch, 6)
    assert not torch.equal(expected, raw_generate(gpt2, batch, 6)), "the intervention should change the text"
    assert torch.equal(ids, expected)


# -- LoReFT / DiReFT specifics ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [LoReFT, DiReFT], ids=lambda c: c.__name__)
def test_state_dict_has_pyreft_keys_and_loads_into_pyreft(gpt2, cls):
    ours = cls(gpt2.get(LAYER), r=4)
    state = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {"weight": (4, 32), "bias": (4,), "rotate_layer": (32, 4)}
    assert torch.equal(state["rotate_layer"], ours.R.T)
    twin = (PyreftLoreft if cls is LoReFT else PyreftDireft)(32, 4)
    twin.load_state_dict(state)
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(twin(h), ours.intervene(h, None, 1.0))


@pytest.mark.parametrize("cls", [LoReFT, DiReFT], ids=lambda c: c.__name__)
def test_a_fresh_one_changes_nothing_only_for_loreft_at_zero_source(gpt2, cls):
    """LoReFT with W h + b = R h is the identity; a fresh DiReFT is not (pyreft's init: a random Linear)."""
    ours = cls(gpt2.get(LAYER), r=4)
    with torch.no_grad():
        ours.learned_source.weight.copy_(ours.R)
        ours.learned_source.bias.zero_()
    h = torch.randn(2, 5, 32)
    if cls is LoReFT:
        torch.testing.assert_close(ours.intervene(h, None, 1.0), h)
    else:
        assert not torch.allclose(ours.intervene(h, None, 1.0), h)


def orthonormality_error(Rt):
    return float((Rt.T @ Rt - torch.eye(Rt.shape[1])).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("cls", [LoReFT, DiReFT], ids=lambda c: c.__name__)
def test_R_stays_orthonormal_through_adamw_with_weight_decay(gpt2, cls):
    ours = cls(gpt2.get(LAYER), r=4)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.5)  # heavy decay: the trap
    h, target = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)), torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(200):
        optimizer.zero_grad()
        ((ours.intervene(h, None, 1.0) - target) ** 2).mean().backward()
        optimizer.step()
    assert orthonormality_error(ours.rotate_layer.weight.detach()) < 1e-5


def test_R_is_what_torchs_matrix_exp_orthogonal_map_computes(gpt2):
    """The written-out map equals `parametrizations.orthogonal(..., orthogonal_map="matrix_exp")` on the same tensors."""
    ours = LoReFT(gpt2.get(LAYER), r=4)
    with torch.no_grad():
        ours.rotate_layer.generator.normal_(0, 0.3)
    holder = torch.nn.Linear(4, 32, bias=False)  # weight (32, 4): tall, as R^T
    torch.nn.utils.parametrizations.orthogonal(holder, orthogonal_map="matrix_exp")
    with torch.no_grad():
        holder.parametrizations.weight[0].base.copy_(ours.rotate_layer.base)
        holder.parametrizations.weight.original.copy_(ours.rotate_layer.generator)
    torch.testing.assert_close(holder.weight, ours.rotate_layer.weight)


def test_loreft_ships_to_a_remote_server_and_copies(gpt2):
    """nnsight's remote serializer pickles the intervention: torch's parametrized modules refuse that."""
    import copy

    from nnsight.intervention import serialization

    ours = LoReFT(gpt2.get(LAYER), r=4)
    assert len(serialization.dumps(ours)) > 0
    clone = copy.deepcopy(ours)
    assert clone.module is ours.module and torch.equal(clone.R, ours.R) and clone.R.data_ptr() != ours.R.data_ptr()


@pytest.mark.slow
def test_householder_would_not_hold_under_weight_decay():
    """Why `matrix_exp`: the same loop on pyreft's (default Householder) rotation drifts from orthonormal.

    The test above could fail: this is the failure it guards against."""
    torch.manual_seed(0)
    twin = PyreftLoreft(32, 4)
    optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.5)
    h, target = torch.randn(8, 32), torch.randn(8, 32)
    start = orthonormality_error(twin.rotate_layer.weight.detach())
    for _ in range(200):
        optimizer.zero_grad()
        ((twin(h) - target) ** 2).mean().backward()
        optimizer.step()
    assert start < 1e-5 and orthonormality_error(twin.rotate_layer.weight.detach()) > 1e-3


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_save_and_load_restore_every_tensor_bit_for_bit(gpt2, cls, tmp_path):
    ours, _ = built(gpt2, cls)
    if cls is not SteeringVector:  # train a little, so R is not its initial value
        optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2)
        for _ in range(5):
            optimizer.zero_grad()
            (ours.intervene(torch.randn(4, 32), None, 1.0) ** 2).sum().backward()
            optimizer.step()
    ours.eval()
    ours.save(tmp_path / "saved")
    import json

    sidecar = json.loads((tmp_path / "saved" / "interventions.json").read_text())
    [entry] = sidecar["interventions"]
    assert entry["kind"] == cls.__name__ and sidecar["format"] == "nnsight-toolbox/intervention-set"
    back = cls.load(tmp_path / "saved", gpt2.get("transformer.h.0"))
    assert back.path == "model.transformer.h.0" and not back.training
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    h = torch.randn(2, 3, 32)
    assert torch.equal(back.intervene(h, None, 1.0), ours.intervene(h, None, 1.0))


def test_load_refuses_another_type_and_a_damaged_file(gpt2, tmp_path):
    LoReFT(gpt2.get(LAYER), r=4).save(tmp_path / "reft")
    with pytest.raises(ValueError, match=r"holds a saved `LoReFT`, which is not a `DiReFT`.*LoReFT.load"):
        DiReFT.load(tmp_path / "reft", gpt2.get(LAYER))
    data = bytearray((tmp_path / "reft" / "interventions.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "reft" / "interventions.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        LoReFT.load(tmp_path / "reft", gpt2.get(LAYER))


def test_load_refuses_a_module_of_another_width(gpt2, tmp_path):
    SteeringVector(gpt2.get(LAYER)).save(tmp_path / "steer")
    with pytest.raises(ValueError, match="output_dim"):
        SteeringVector.load(tmp_path / "steer", gpt2.get("transformer.h.0.mlp.c_fc"))


# -- dtype and dropout --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_computed_in_the_interventions_dtype_and_cast_back(gpt2, cls):
    ours, _ = built(gpt2, cls)
    h = torch.randn(2, 3, 32).to(torch.bfloat16)
    out = ours.intervene(h, None, 1.0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ours.intervene(h.float(), None, 1.0).to(torch.bfloat16))


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_dropout_applies_in_training_mode_only(gpt2, cls):
    args = () if cls is SteeringVector else (4,)
    ours = cls(gpt2.get(LAYER), *args, dropout=0.5)
    plain = cls(gpt2.get(LAYER), *args)
    plain.load_state_dict(ours.state_dict())
    if cls is SteeringVector:
        with torch.no_grad():
            ours.v.fill_(1.0), plain.v.fill_(1.0)
    h = torch.randn(2, 3, 32)
    torch.manual_seed(0)
    assert not torch.allclose(ours.train().intervene(h, None, 1.0), plain.intervene(h, None, 1.0))
    assert torch.equal(ours.eval().intervene(h, None, 1.0), plain.eval().intervene(h, None, 1.0))


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("cls", [LoReFT, DiReFT], ids=lambda c: c.__name__)
def test_a_parametrized_source_tensor_is_used_as_parametrized(gpt2, cls, name):
    """`torch.nn.utils.parametrize` moves W or b out of the parameter table; the formula still reads its value."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, tensor):
            return tensor * 2

    ours, _ = built(gpt2, cls)
    h = torch.randn(2, 3, 32)
    source = ours.learned_source
    with torch.no_grad():
        getattr(source, name).add_(1.0)  # a bias of zeros doubles to the same zeros
        expected = ours.intervene(h, None, 1.0)  # (pyreft's formula on these tensors: test_trace_logits_equal_the_reference)
        getattr(source, name).mul_(0.5)
    parametrize.register_parametrization(source, name, Doubled())  # the same tensor again, computed
    with torch.no_grad():
        torch.testing.assert_close(ours.intervene(h, None, 1.0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a grid of kinds x dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_every_dtype_builds_and_trains(gpt2, cls, dtype):
    """QR (the orthogonal init) has no half-precision CPU kernel: it runs in float32 and is cast."""
    ours = cls(gpt2.get(LAYER), *(() if cls is SteeringVector else (4,)), dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    with gpt2.trace(PROMPTS):
        ours(positions=-1)
        logits = gpt2.lm_head.output.save()
    assert logits.dtype == torch.float32  # cast back to the model's dtype
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in ours.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_a_float32_intervention_on_a_bf16_model(cls):
    from nnsight_toolbox.testing import load_tiny_model

    model = load_tiny_model("gpt2", dtype=torch.bfloat16)
    ours = cls(model.transformer.h[1], *(() if cls is SteeringVector else (4,)))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    with model.trace(PROMPTS):
        ours()
        h = model.transformer.h[1].output.save()
    assert h.dtype == torch.bfloat16
    with model.trace(PROMPTS):
        base = model.transformer.h[1].output.save()
    expected = ours.intervene(base, None, 1.0)  # float32 arithmetic, one rounding to bf16
    assert torch.equal(h, expected)


@pytest.mark.parametrize("build", [lambda m: SteeringVector(m.get(LAYER), output_dim=7), lambda m: LoReFT(m.get(LAYER), r=2, output_dim=7), lambda m: DiReFT(m.get(LAYER), r=2, output_dim=7)])
def test_an_intervention_built_for_another_width_is_refused_by_name_not_broadcast(gpt2, build):
    """Width 7 against the block's 32: a (..., 32) + (7,) must not reach torch, nor a (..., 1) output broadcast."""
    intervention = build(gpt2)
    with pytest.raises(ValueError, match=rf"`{type(intervention).__name__}` on `model\.{LAYER}` was built for outputs of width 7"):
        with gpt2.trace(PROMPTS[0]):
            intervention()
            gpt2.lm_head.output.save()
