"""`LORA.on`: many adapters built and applied by one call, against plain hooks on every target."""

import copy
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_generate, hf_logits, randomize, randomized, reference_hooks

from nnsight_toolbox import LORA, LoraSet, Optimization
from nnsight_toolbox.optim import dims

PROMPT = "The Eiffel Tower is in"
#: Per family: targets that adapt several modules in every layer.
MANY = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"]}


def test_one_adapter_per_matching_module_in_model_order(model, family):
    adapters = LORA.on(model, MANY[family][::-1], r=4)  # targets in reverse order
    names = [path for path, _ in model._module.named_modules()]
    expected = [f"model.{p}" for p in names if p and any(p.endswith("." + t) for t in MANY[family])]
    assert list(adapters) == expected
    assert all(isinstance(lora, LORA) and lora.path == path for path, lora in adapters.items())
    assert isinstance(adapters, Optimization) and isinstance(adapters, Mapping)


def test_applied_set_equals_a_hook_on_every_target(model, family):
    adapters = randomized(LORA.on(model, MANY[family], r=4))
    with model.trace(PROMPT):
        adapters(alpha=0.7)
        logits = model.lm_head.output.save()
    with reference_hooks(model, adapters, alpha=0.7):
        expected = hf_logits(model, PROMPT)
    assert not torch.allclose(expected, hf_logits(model, PROMPT), atol=1e-4), "the adapters should change the logits"
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_hooks_on_every_target(model, family):
    adapters = randomized(LORA.on(model, MANY[family], r=4), scale=2.0)
    with model.generate(PROMPT, max_new_tokens=6, do_sample=False) as tracer:
        adapters()
        ids = tracer.result.save()
    with reference_hooks(model, adapters):
        expected = hf_generate(model, PROMPT, 6)
    assert not torch.equal(expected, hf_generate(model, PROMPT, 6)), "the adapters should change the text"
    assert torch.equal(ids, expected)


def test_adapters_switched_on_in_any_order_with_reads_between(gpt2):
    """Reverse model order, a read of an earlier module's output in between: no OutOfOrderError."""
    adapters = randomized(LORA.on(gpt2, ["c_attn", "c_fc"], r=4))
    with gpt2.trace(PROMPT):
        for path in reversed(list(adapters)[1:]):
            adapters[path]()
        embedded = gpt2.transformer.h[0].ln_1.output.save()  # runs before the first target
        adapters[list(adapters)[0]]()
        block = gpt2.transformer.h[1].output.save()
        logits = gpt2.lm_head.output.save()
    with reference_hooks(gpt2, adapters):
        expected = hf_logits(gpt2, PROMPT)
    assert embedded.shape[-1] == 32 and block.shape[-1] == 32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_set_and_single_adapter_outputs_read_in_the_trace_are_adapted(gpt2):
    adapters = randomized(LORA.on(gpt2, ["c_attn"], r=4))
    with gpt2.trace(PROMPT):
        adapters()
        first = gpt2.transformer.h[0].attn.c_attn.output.save()
        second = gpt2.transformer.h[1].attn.c_attn.output.save()
    batch = gpt2.tokenizer(PROMPT, return_tensors="pt")
    seen = []
    with reference_hooks(gpt2, adapters), torch.no_grad():
        handles = [gpt2._module.get_submodule(p.split(".", 1)[1]).register_forward_hook(lambda m, i, o: seen.append(o)) for p in adapters]
        try:
            gpt2._module(**batch)
        finally:
            for handle in handles:
                handle.remove()
    assert len(seen) == 2
    for out, expected in zip((first, second), seen):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_adapter_and_equal_hooks(gpt2):
    adapters = randomized(LORA.on(gpt2, ["c_attn", "c_fc"], r=4))
    ids = gpt2.tokenizer(PROMPT, return_tensors="pt").input_ids
    with gpt2.trace(PROMPT):
        adapters()
        logits = gpt2.lm_head.output.save()
    F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()

    leaves = {path: (lora.WA.detach().clone().requires_grad_(True), lora.WB.detach().clone().requires_grad_(True)) for path, lora in adapters.items()}
    handles = []
    for path, (WA, WB) in leaves.items():
        module = gpt2._module.get_submodule(path.split(".", 1)[1])
        handles.append(module.register_forward_hook(lambda m, i, o, WA=WA, WB=WB: o + i[0] @ WA @ WB))
    try:
        reference = gpt2._module(input_ids=ids).logits
        F.cross_entropy(reference[0, :-1], ids[0, 1:]).backward()
    finally:
        for handle in handles:
            handle.remove()
    for path, lora in adapters.items():
        assert lora.WA.grad.abs().sum() > 0 and lora.WB.grad.abs().sum() > 0, path
        torch.testing.assert_close(lora.WA.grad, leaves[path][0].grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lora.WB.grad, leaves[path][1].grad, rtol=1e-4, atol=1e-6)


def test_parameters_are_every_adapters_in_model_order_for_one_optimizer(gpt2):
    adapters = LORA.on(gpt2, ["c_fc", "c_attn"], r=4)
    expected = [p for lora in adapters.values() for p in (lora.WA, lora.WB)]
    assert len(adapters.parameters()) == 2 * len(adapters) == 8
    assert all(a is b for a, b in zip(adapters.parameters(), expected))
    torch.optim.AdamW(adapters.parameters(), lr=1e-3)  # accepted as is


def test_state_dict_keys_are_module_paths_and_round_trip(gpt2):
    adapters = randomized(LORA.on(gpt2, ["c_attn"], r=4))
    state = adapters.state_dict()
    assert list(state) == [
        "model.transformer.h.0.attn.c_attn.WA",
        "model.transformer.h.0.attn.c_attn.WB",
        "model.transformer.h.1.attn.c_attn.WA",
        "model.transformer.h.1.attn.c_attn.WB",
    ]
    fresh = LORA.on(gpt2, ["c_attn"], r=4)
    fresh.load_state_dict(state)
    for path in adapters:
        assert torch.equal(fresh[path].WA, adapters[path].WA) and torch.equal(fresh[path].WB, adapters[path].WB)
    with gpt2.trace(PROMPT):
        fresh()
        logits = gpt2.lm_head.output.save()
    with reference_hooks(gpt2, adapters):
        torch.testing.assert_close(logits, hf_logits(gpt2, PROMPT), rtol=1e-5, atol=1e-5)


def test_load_state_dict_refuses_keys_of_other_modules(gpt2):
    adapters = LORA.on(gpt2, ["c_attn"], r=4)
    other = LORA.on(gpt2, ["c_fc"], r=4).state_dict()
    before = {k: v.clone() for k, v in adapters.state_dict().items()}
    with pytest.raises(KeyError, match="keys for no member: .*mlp.c_fc.WA"):
        adapters.load_state_dict(other)
    assert all(torch.equal(v, before[k]) for k, v in adapters.state_dict().items())


def test_indexing_by_nnsight_path_hf_path_or_envoy(gpt2):
    adapters = LORA.on(gpt2, ["c_attn"], r=4)
    first = adapters["model.transformer.h.0.attn.c_attn"]
    assert adapters["transformer.h.0.attn.c_attn"] is first
    assert adapters[gpt2.transformer.h[0].attn.c_attn] is first
    assert "transformer.h.1.attn.c_attn" in adapters and "transformer.h.1.mlp.c_fc" not in adapters
    assert len(adapters) == 2 and adapters.get("nope") is None
    with pytest.raises(KeyError, match="model.transformer.h.0.attn.c_attn"):
        adapters["transformer.h.0.mlp"]


def test_trainable_parameters_match_a_hand_count(gpt2, capsys):
    adapters = LORA.on(gpt2, ["c_attn"], r=4)
    trainable = 2 * (32 * 4 + 4 * 96)  # two layers of WA (32, 4) + WB (4, 96): c_attn is 32 -> 96 wide
    total = sum(p.numel() for p in gpt2._module.parameters()) + trainable
    count = adapters.trainable_parameters()
    assert (count.trainable, count.total) == (trainable, total)
    adapters.print_trainable_parameters()
    assert capsys.readouterr().out == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"


def test_frozen_adapter_tensors_are_not_counted_trainable(gpt2):
    adapters = LORA.on(gpt2, ["c_attn"], r=4)
    adapters["transformer.h.0.attn.c_attn"].requires_grad_(False)
    assert adapters.trainable_parameters().trainable == 32 * 4 + 4 * 96


def test_a_set_of_existing_adapters_on_blocks_needs_one_scan(gpt2, monkeypatch):
    scans = []
    real = dims.scan_many_dims
    monkeypatch.setattr(dims, "scan_many_dims", lambda envoys, *rest: scans.append(len(envoys)) or real(envoys, *rest))
    adapters = LORA.on(gpt2, ["mlp", "attn"], r=4)
    assert scans == [4]  # four modules without a known weight, one scan
    assert all((lora.input_dim, lora.output_dim) == (32, 32) for lora in adapters.values())


def test_a_set_only_adapts_the_invoke_that_called_it(gpt2):
    adapters = randomized(LORA.on(gpt2, ["c_attn"], r=4))
    prompts = [PROMPT, PROMPT.upper()]
    with gpt2.trace() as tracer:
        with tracer.invoke(prompts[0]):
            adapters()
            adapted = gpt2.lm_head.output.save()
        with tracer.invoke(prompts[1]):
            base = gpt2.lm_head.output.save()
    with reference_hooks(gpt2, adapters):
        torch.testing.assert_close(adapted, hf_logits(gpt2, prompts[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, hf_logits(gpt2, prompts[1]), rtol=1e-5, atol=1e-5)


def test_after_the_run_the_model_is_the_base_model(gpt2):
    adapters = randomized(LORA.on(gpt2, ["c_attn", "c_fc"], r=4))
    with gpt2.trace(PROMPT):
        adapters()
    with gpt2.trace(PROMPT):
        logits = gpt2.lm_head.output.save()
    assert torch.equal(logits, hf_logits(gpt2, PROMPT))


def test_a_deep_copy_shares_the_model_and_copies_the_weights(gpt2):
    adapters = randomized(LORA.on(gpt2, ["c_attn"], r=4))
    clone = copy.deepcopy(adapters)
    path = "model.transformer.h.0.attn.c_attn"
    assert clone[path].module is adapters[path].module
    assert clone[path].WA is not adapters[path].WA and torch.equal(clone[path].WA, adapters[path].WA)
    assert list(clone.state_dict()) == list(adapters.state_dict())


def test_existing_adapters_make_a_set(gpt2):
    first, second = LORA(gpt2.transformer.h[1].mlp, r=2), LORA(gpt2.transformer.h[0].mlp, r=3)
    adapters = LoraSet([first, second])
    assert list(adapters.values()) == [second, first]  # model order


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda m: LoraSet([]), TypeError, "non-empty"),
        (lambda m: LoraSet(LORA(m.transformer.h[0].mlp, r=2)), TypeError, "iterable of `LORA`"),
        (lambda m: LoraSet([m.transformer.h[0].mlp]), TypeError, "Envoy"),
        (lambda m: LoraSet([LORA(m.transformer.h[0].mlp, r=2), LORA(m.transformer.h[0].mlp, r=2)]), ValueError, "same module"),
        (lambda m: LoraSet([LORA(m.transformer.h[0].mlp, r=2), LORA(m.transformer.h[0].mlp.c_fc, r=2)]), ValueError, "lies inside"),
        (lambda m: LORA.on(m, r".*mlp.*", r=2), ValueError, "lies inside"),
    ],
)
def test_bad_sets_are_refused_clearly(gpt2, build, error, match):
    with pytest.raises(error, match=match):
        build(gpt2)


def test_adapters_of_two_models_are_refused(model_paths, gpt2):
    from conftest import load

    other = load(model_paths["gpt2"])
    with pytest.raises(ValueError, match="same model"):
        LoraSet([LORA(gpt2.transformer.h[0].mlp, r=2), LORA(other.transformer.h[1].mlp, r=2)])


def test_set_alpha_and_steps_are_checked(gpt2):
    adapters = LORA.on(gpt2, ["c_attn"], r=4)
    with pytest.raises(ValueError, match="`alpha` must be a finite number"):
        with gpt2.trace(PROMPT):
            adapters(alpha=float("nan"))
    with pytest.raises(RuntimeError, match="must be called inside"):
        adapters()


def test_options_reach_every_adapter(gpt2):
    adapters = LORA.on(gpt2, ["c_attn"], r=2, dropout=0.1, dtype=torch.float64)
    assert all(lora.r == 2 and lora.dropout == 0.1 and lora.WA.dtype == torch.float64 for lora in adapters.values())


def test_on_a_submodule_searches_below_it_only(gpt2):
    adapters = LORA.on(gpt2.transformer.h[1], ["c_attn", "c_fc"], r=2)
    assert list(adapters) == ["model.transformer.h.1.attn.c_attn", "model.transformer.h.1.mlp.c_fc"]
