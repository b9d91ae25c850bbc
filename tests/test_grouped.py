"""Many interventions in one batch, one per invoke, applied as one computation (`optim/grouped.py`).

Every test compares with a reference that shares no code with the package: a
plain torch forward hook on the raw Hugging Face module that adds each row's
own delta (``alpha * x @ WA_k @ WB_k``, or ``alpha * v_k``) to that row, and
PEFT's mixed-adapter batch (``adapter_names=``). Pad positions are not
compared: nnsight and Hugging Face place them differently.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import randomize

import families
from nnsight_toolbox import LORA, SteeringVector
from nnsight_toolbox.optim import grouped

PROMPTS = ["The Eiffel Tower", "Paris is", "A b c d e f g", "xyz"]
PATH = "transformer.h.0.attn.c_attn"


def batch_of(model, prompts):
    return model.tokenizer(prompts, return_tensors="pt", padding=True)


@contextlib.contextmanager
def per_row_hook(module, deltas):
    """Add ``deltas[b](x_b)`` (a function of row b's input ``(T, in)``, or None) to row b of the output.

    A 2-D output is OPT's flattened (B*T, H), viewed here as (B, T, H).
    """

    def hook(mod, args, output):
        x = args[0]
        out = output[0] if isinstance(output, tuple) else output
        batch = len(deltas)
        x3 = x.reshape(batch, -1, x.shape[-1])
        out3 = out.reshape(batch, -1, out.shape[-1])
        rows = []
        for b in range(batch):
            rows.append(out3[b] if deltas[b] is None else out3[b] + deltas[b](x3[b]))
        new = torch.stack(rows).reshape(out.shape)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def lora_delta(WA, WB, alpha=1.0, mask=None):
    def delta(x):
        d = alpha * (x @ WA @ WB)
        return d if mask is None else d * mask[:, None]

    return delta


def loras(model, count, seed=0, r=4, path=PATH):
    made = []
    for k in range(count):
        lora = LORA(model.get(path), r=r)
        randomize(lora, seed=seed + k)
        made.append(lora)
    return made


def raw_logits(model, prompts):
    with torch.no_grad():
        return model._module(**batch_of(model, prompts)).logits


def invoked_logits(model, prompts, switch=None):
    """The logits of ``prompts``, one invoke each; ``switch(k)`` runs inside invoke ``k`` (it switches row k's interventions on)."""
    with model.trace() as tracer:
        for k in range(len(prompts)):
            with tracer.invoke(prompts[k]):
                if switch is not None:
                    switch(k)
        with tracer.invoke():
            logits = model.lm_head.output.save()
    return logits


def traced_logits(model, prompts):
    """The logits of ``prompts``, one invoke each, traced with no intervention: the reference's hooks
    then see the batch nnsight builds (its padding), with none of the package's code."""
    return invoked_logits(model, prompts)


def spy_groups(monkeypatch):
    """Count the group computations (`grouped.apply` calls that did not fall back)."""
    seen = []
    original = grouped.apply

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append((len(args[0].members), result is not None))
        return result

    monkeypatch.setattr(grouped, "apply", spy)
    return seen


def test_each_invoke_gets_its_own_lora_as_one_computation(gpt2, monkeypatch):
    seen = spy_groups(monkeypatch)
    adapters = loras(gpt2, len(PROMPTS))
    with gpt2.trace() as tracer:
        for k in range(len(PROMPTS)):
            with tracer.invoke(PROMPTS[k]):
                adapters[k]()
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    assert seen and all(done and size == len(PROMPTS) for size, done in seen), seen
    deltas = []
    for lora in adapters:
        deltas.append(lora_delta(lora.WA.detach(), lora.WB.detach()))
    with torch.no_grad(), per_row_hook(gpt2._module.get_submodule(PATH), deltas):
        reference = traced_logits(gpt2, PROMPTS)
    assert torch.allclose(logits, reference, atol=1e-5)


def test_rows_with_no_intervention_are_unchanged_and_a_second_kind_applies_beside(gpt2):
    adapters = loras(gpt2, 3)
    vectors = []
    for k in range(2):
        vector = SteeringVector(gpt2.transformer.h[1])
        with torch.no_grad():
            vector.v.normal_(generator=torch.Generator().manual_seed(k))
        vectors.append(vector)
    with gpt2.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            adapters[0]()
            vectors[0](alpha=2.0)
        with tracer.invoke(PROMPTS[1]):
            pass
        with tracer.invoke(PROMPTS[2]):
            adapters[1](alpha=0.5)
            vectors[1]()
        with tracer.invoke(PROMPTS[3]):
            adapters[2]()
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    lora_deltas = [
        lora_delta(adapters[0].WA.detach(), adapters[0].WB.detach()),
        None,
        lora_delta(adapters[1].WA.detach(), adapters[1].WB.detach(), 0.5),
        lora_delta(adapters[2].WA.detach(), adapters[2].WB.detach()),
    ]
    v0, v1 = vectors[0].v.detach(), vectors[1].v.detach()
    steer_deltas = [lambda x: 2.0 * v0, None, lambda x: v1, None]
    with torch.no_grad(), per_row_hook(gpt2._module.get_submodule(PATH), lora_deltas), per_row_hook(gpt2._module.get_submodule("transformer.h.1"), steer_deltas):
        reference = traced_logits(gpt2, PROMPTS)
    base = traced_logits(gpt2, PROMPTS)
    assert torch.allclose(logits, reference, atol=1e-5)
    assert torch.equal(logits[1], base[1]), "the row no intervention acts on is the base model's"


def test_rows_equal_peft_mixed_batch(gpt2):
    peft = pytest.importorskip("peft")
    adapters = loras(gpt2, 3, r=4)
    prompts = ["Hello", "World", "abcde"]  # one length: PEFT runs outside nnsight, whose padding differs
    with gpt2.trace() as tracer:
        for k in range(3):
            with tracer.invoke(prompts[k]):
                adapters[k]()
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=[PATH], lora_dropout=0.0, fan_in_fan_out=True)
    model = peft.get_peft_model(copy.deepcopy(gpt2._module), config, adapter_name="a0")
    for k in range(1, 3):
        model.add_adapter(f"a{k}", config)
    with torch.no_grad():
        for k in range(3):
            layer = model.base_model.model.get_submodule(PATH)
            layer.lora_A[f"a{k}"].weight.copy_(adapters[k].WA.T)
            layer.lora_B[f"a{k}"].weight.copy_(adapters[k].WB.T)
    model.eval()
    batch = batch_of(gpt2, prompts)
    with torch.no_grad():
        reference = model(**batch, adapter_names=["a0", "a1", "a2"]).logits
    assert torch.allclose(logits, reference, atol=1e-5)


def test_gradients_reach_each_members_own_factors(gpt2):
    adapters = loras(gpt2, 3)
    prompts = PROMPTS[:3]
    with gpt2.trace() as tracer:
        for k in range(3):
            with tracer.invoke(prompts[k]):
                adapters[k]()
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    weights = torch.linspace(0.5, 1.5, logits.shape[-1])
    (logits * weights).sum().backward()
    clones = []
    for lora in adapters:
        clones.append((lora.WA.detach().clone().requires_grad_(), lora.WB.detach().clone().requires_grad_()))
    deltas = []
    for WA, WB in clones:
        deltas.append(lora_delta(WA, WB))
    with per_row_hook(gpt2._module.get_submodule(PATH), deltas):
        reference = traced_logits(gpt2, prompts)
    (reference * weights).sum().backward()
    for lora, (WA, WB) in zip(adapters, clones):
        assert lora.WA.grad is not None and lora.WB.grad is not None
        assert torch.allclose(lora.WA.grad, WA.grad, atol=1e-4, rtol=1e-4)
        assert torch.allclose(lora.WB.grad, WB.grad, atol=1e-4, rtol=1e-4)


def real_columns(mask_row):
    return mask_row.nonzero()[:, 0]


def test_positions_hold_per_invoke(gpt2, monkeypatch):
    seen = spy_groups(monkeypatch)
    vectors = []
    for k in range(3):
        vector = SteeringVector(gpt2.transformer.h[0])
        with torch.no_grad():
            vector.v.normal_(generator=torch.Generator().manual_seed(k))
        vectors.append(vector)
    adapters = loras(gpt2, 3)
    positions = [-1, 0, [1, 2]]
    prompts = PROMPTS[:3]
    with gpt2.trace() as tracer:
        for k in range(3):
            with tracer.invoke(prompts[k]):
                vectors[k](alpha=1.5, positions=positions[k])
                adapters[k](positions=positions[k])
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    assert seen and all(done for _, done in seen)
    batch = batch_of(gpt2, prompts)
    real = batch.attention_mask.bool()
    masks = []
    for b in range(3):
        mask = torch.zeros(real.shape[1])
        mask[real_columns(real[b])[positions[b]]] = 1.0
        masks.append(mask)
    steer_deltas, lora_deltas = [], []
    for b in range(3):
        v, mask = vectors[b].v.detach(), masks[b]
        steer_deltas.append(lambda x, v=v, mask=mask: 1.5 * mask[:, None] * v)
        lora_deltas.append(lora_delta(adapters[b].WA.detach(), adapters[b].WB.detach(), mask=masks[b]))
    with torch.no_grad(), per_row_hook(gpt2._module.get_submodule("transformer.h.0"), steer_deltas), per_row_hook(gpt2._module.get_submodule(PATH), lora_deltas):
        reference = traced_logits(gpt2, prompts)
    assert torch.allclose(logits, reference, atol=1e-5)


def test_gradients_with_positions_and_row_alphas_reach_each_members_own_factors(gpt2, monkeypatch):
    """A group whose members act at their own positions, one with an alpha per row: each gets its own exact gradient."""
    seen = spy_groups(monkeypatch)
    adapters = loras(gpt2, 3)
    positions = [-1, 0, [1, 2]]
    alphas = [0.5, torch.tensor([2.0]), 1.0]  # the second member: one alpha per row of its one-row invoke
    prompts = PROMPTS[:3]
    with gpt2.trace() as tracer:
        for k in range(3):
            with tracer.invoke(prompts[k]):
                adapters[k](alpha=alphas[k], positions=positions[k])
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    assert seen and all(done for _, done in seen)  # one group computation, not one by one
    weights = torch.linspace(0.5, 1.5, logits.shape[-1])
    real = batch_of(gpt2, prompts).attention_mask.bool()
    (logits * weights * real[:, :, None]).sum().backward()  # pad positions are not compared (see the module's docstring)
    clones, deltas = [], []
    for b in range(3):
        mask = torch.zeros(real.shape[1])
        mask[real_columns(real[b])[positions[b]]] = 1.0
        WA, WB = adapters[b].WA.detach().clone().requires_grad_(), adapters[b].WB.detach().clone().requires_grad_()
        clones.append((WA, WB))
        deltas.append(lora_delta(WA, WB, alpha=float(alphas[b]), mask=mask))
    with per_row_hook(gpt2._module.get_submodule(PATH), deltas):
        reference = traced_logits(gpt2, prompts)
    (reference * weights * real[:, :, None]).sum().backward()
    for lora, (WA, WB) in zip(adapters, clones):
        assert WA.grad.abs().sum() > 0  # the reference's gradient is not trivially zero
        assert torch.allclose(lora.WA.grad, WA.grad, atol=1e-4, rtol=1e-4)
        assert torch.allclose(lora.WB.grad, WB.grad, atol=1e-4, rtol=1e-4)


def test_steps_per_invoke_in_generate_equal_a_hook_token_for_token(gpt2):
    adapters = loras(gpt2, 3, path="transformer.h.0.mlp.c_fc")
    for lora in adapters:
        randomize(lora, seed=7, scale=3.0)
    steps = [None, 0, slice(1, None)]
    prompts = PROMPTS[:3]
    new = 5
    with gpt2.generate(max_new_tokens=new, do_sample=False) as tracer:
        for k in range(3):
            with tracer.invoke(prompts[k]):
                adapters[k](steps=steps[k])
        with tracer.invoke():
            ids = tracer.result.save()
    passes = [0]

    def on(b):
        step = passes[0]
        return steps[b] is None or (steps[b] == 0 and step == 0) or (isinstance(steps[b], slice) and step >= 1)

    module = gpt2._module.get_submodule("transformer.h.0.mlp.c_fc")
    deltas = []
    for b in range(3):
        WA, WB = adapters[b].WA.detach(), adapters[b].WB.detach()
        deltas.append(lambda x, b=b, WA=WA, WB=WB: (x @ WA @ WB) * (1.0 if on(b) else 0.0))
    def advance(mod, args, output):
        passes[0] += 1

    with torch.no_grad(), per_row_hook(module, deltas):
        handle = gpt2._module.register_forward_hook(advance)
        try:
            with gpt2.generate(max_new_tokens=new, do_sample=False) as tracer:
                for k in range(3):
                    with tracer.invoke(prompts[k]):
                        pass
                with tracer.invoke():
                    reference = tracer.result.save()
        finally:
            handle.remove()
    assert torch.equal(ids, reference)
    with torch.no_grad(), gpt2.generate(max_new_tokens=new, do_sample=False) as tracer:
        for k in range(3):
            with tracer.invoke(prompts[k]):
                pass
        with tracer.invoke():
            base = tracer.result.save()
    assert not torch.equal(ids, base), "the adapters must change the tokens, or the test shows nothing"


def test_a_parameter_changed_between_runs_is_seen(gpt2):
    adapters = loras(gpt2, 2)
    prompts = PROMPTS[:2]

    def adapted_and_reference():
        """This run's logits, and a per-row hook's from the adapters' factors as they are now."""
        with torch.no_grad():
            logits = invoked_logits(gpt2, prompts, lambda k: adapters[k]())
            deltas = []
            for lora in adapters:
                deltas.append(lora_delta(lora.WA.detach(), lora.WB.detach()))
            with per_row_hook(gpt2._module.get_submodule(PATH), deltas):
                reference = traced_logits(gpt2, prompts)
        return logits, reference

    results = []
    for scale in (1.0, 3.0):
        with torch.no_grad():
            adapters[1].WB.mul_(scale)  # in place: the stack is rebuilt from the new version
        logits, reference = adapted_and_reference()
        assert torch.allclose(logits, reference, atol=1e-5)
        results.append(logits)
    assert not torch.allclose(results[0][1], results[1][1])
    for change in ("replaced", "data"):
        if change == "replaced":
            adapters[0].WB = torch.nn.Parameter(adapters[0].WB.detach() * 2)  # a new tensor
        else:
            adapters[0].WB.data = adapters[0].WB.detach() * -1.5  # the same tensor and `_version`, new storage
        before = results[-1][0]
        logits, reference = adapted_and_reference()
        assert torch.allclose(logits, reference, atol=1e-5), change
        assert not torch.allclose(logits[0], before), change  # row 0 moved: a stale stack would have kept it
        results.append(logits)



def hooked_reference(model, prompts, adapters):
    """A per-row hook's logits from the adapters' factors as they are now, in each adapter's dtype."""

    def delta(lora):
        WA, WB = lora.WA.detach(), lora.WB.detach()
        return lambda x: (x.to(WA.dtype) @ WA @ WB).to(x.dtype)

    with torch.no_grad(), per_row_hook(model._module.get_submodule(PATH), [delta(lora) for lora in adapters]):
        return traced_logits(model, prompts)


def test_a_parameter_replaced_inside_the_run_after_its_switch_on_is_seen(gpt2, monkeypatch):
    seen = spy_groups(monkeypatch)
    adapters = loras(gpt2, 3)
    prompts = PROMPTS[:3]
    with torch.no_grad():
        invoked_logits(gpt2, prompts, lambda k: adapters[k]())  # the stack of this layout is kept
        new = adapters[1].WB.detach() * -3

        def switch(k):
            adapters[k]()
            if k == 1:  # after its switch-on took the factors, before the model runs
                adapters[1].WB = torch.nn.Parameter(new)

        logits = invoked_logits(gpt2, prompts, switch)
    assert all(done for _, done in seen) and len(seen) == 2, seen
    assert adapters[1].WB.detach().equal(new)
    assert torch.allclose(logits, hooked_reference(gpt2, prompts, adapters), atol=1e-5)


def test_a_parameter_replaced_in_the_table_itself_between_runs_is_seen(gpt2):
    adapters = loras(gpt2, 2)
    prompts = PROMPTS[:2]
    with torch.no_grad():
        before = invoked_logits(gpt2, prompts, lambda k: adapters[k]())
        adapters[0]._parameters["WB"] = torch.nn.Parameter(adapters[0].WB.detach() * 4)  # past `__setattr__`
        logits = invoked_logits(gpt2, prompts, lambda k: adapters[k]())
    assert not torch.allclose(logits[0], before[0])
    assert torch.allclose(logits, hooked_reference(gpt2, prompts, adapters), atol=1e-5)


@pytest.mark.parametrize("how", ["to", "data"])
def test_a_member_moved_to_another_dtype_is_computed_in_it(gpt2, monkeypatch, how):
    """`.to()` is seen at the next switch-on; a ``.data =`` of another dtype, which no key shows, where the group stacks."""
    seen = spy_groups(monkeypatch)
    adapters = loras(gpt2, 3)
    prompts = PROMPTS[:3]
    with torch.no_grad():
        invoked_logits(gpt2, prompts, lambda k: adapters[k]())
        assert seen == [(3, True)]
        if how == "to":
            adapters[1].to(torch.float64)
        else:
            adapters[1].WA.data = adapters[1].WA.detach().double()
            adapters[1].WB.data = adapters[1].WB.detach().double()
        assert adapters[1].WA.dtype == torch.float64
        seen.clear()
        logits = invoked_logits(gpt2, prompts, lambda k: adapters[k]())
        reference = hooked_reference(gpt2, prompts, adapters)
        assert torch.allclose(logits, reference, atol=1e-5)
        # `.data`: this run's group found the mixed dtypes and went one by one; either way the next
        # switch-on keys the float64 member apart, so the other two are one group of two
        assert seen == ([(2, True)] if how == "to" else [(3, False)]), seen
        seen.clear()
        again = invoked_logits(gpt2, prompts, lambda k: adapters[k]())
    assert seen == [(2, True)], seen
    assert torch.allclose(again, reference, atol=1e-5)


def test_a_kept_key_follows_the_adapters_options(gpt2):
    lora = loras(gpt2, 1)[0]
    key, _ = grouped.key_of(lora, [0, 1], 1.0)
    assert grouped.key_of(lora, [0, 1], 1.0)[0] == key
    lora.dropout = 0.25
    changed, _ = grouped.key_of(lora, [0, 1], 1.0)
    assert changed != key and 0.25 in changed[1] and changed[2] is True
    copied = copy.deepcopy(lora)
    assert grouped.MEMO not in copied.__dict__  # a copy works out its own, for its own tensors
    assert grouped.key_of(copied, [0, 1], 1.0)[0] == changed


def test_what_a_switch_on_keeps_is_not_sent_with_a_remote_request(gpt2, monkeypatch):
    from nnsight_toolbox.optim import optimization

    adapters = loras(gpt2, 2)
    invoked_logits(gpt2, PROMPTS[:2], lambda k: adapters[k]())
    assert grouped.MEMO in adapters[0].__dict__ and "_device_memo" in adapters[0].__dict__
    monkeypatch.setattr(optimization, "_pickled_for_nnsight_server", lambda: True)  # as nnsight's serializer pickles it
    state = adapters[0].__reduce_ex__(2)[2]
    assert grouped.MEMO not in state and "_device_memo" not in state
    assert state["_parameters"]["WA"] is adapters[0].WA and state["_merge_record"] is None


@pytest.mark.parametrize("kind", ["lora", "steering"])
def test_per_row_alphas_equal_separate_runs(gpt2, kind):
    prompts = ["Hello", "World", "abcde", "12345"]  # one length: no padding
    alphas = torch.tensor([0.0, 0.5, 1.0, 2.5])
    if kind == "lora":
        intervention = loras(gpt2, 1)[0]
        module = gpt2._module.get_submodule(PATH)
    else:
        intervention = SteeringVector(gpt2.transformer.h[1])
        with torch.no_grad():
            intervention.v.normal_(generator=torch.Generator().manual_seed(0))
        module = gpt2._module.get_submodule("transformer.h.1")
    with gpt2.trace(prompts):
        intervention(alpha=alphas)
        logits = gpt2.lm_head.output.save()
    for b, alpha in enumerate(alphas.tolist()):
        if kind == "lora":
            delta = lora_delta(intervention.WA.detach(), intervention.WB.detach(), alpha)
        else:
            v = intervention.v.detach()
            delta = lambda x, v=v, alpha=alpha: alpha * v  # noqa: E731
        with torch.no_grad(), per_row_hook(module, [delta] * len(prompts)):
            alone = raw_logits(gpt2, prompts)
        assert torch.allclose(logits[b], alone[b], atol=1e-5), alpha


def test_per_row_alphas_in_an_invoke_of_its_own_rows(gpt2):
    lora = loras(gpt2, 1)[0]
    other = loras(gpt2, 1, seed=5)[0]
    prompts = ["Hello", "World", "abcde"]
    with gpt2.trace() as tracer:
        with tracer.invoke(prompts[:2]):
            lora(alpha=[2.0, -1.0])
        with tracer.invoke(prompts[2]):
            other()
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    deltas = [lora_delta(lora.WA.detach(), lora.WB.detach(), 2.0), lora_delta(lora.WA.detach(), lora.WB.detach(), -1.0), lora_delta(other.WA.detach(), other.WB.detach())]
    with torch.no_grad(), per_row_hook(gpt2._module.get_submodule(PATH), deltas):
        reference = traced_logits(gpt2, prompts)
    assert torch.allclose(logits, reference, atol=1e-5)


def test_a_per_row_alpha_of_the_wrong_length_is_refused(gpt2):
    lora = loras(gpt2, 1)[0]
    with pytest.raises(ValueError, match=r"given 3 alphas, one per row, but the invoke .* has 2 row"):
        with gpt2.trace() as tracer:
            with tracer.invoke(["Hello", "World"]):
                lora(alpha=[0.0, 1.0, 2.0])
            with tracer.invoke("abc"):
                pass


@pytest.mark.parametrize("alpha", [[1.0, float("nan")], [[1.0, 2.0]], [], "ab"])
def test_bad_per_row_alphas_are_refused(gpt2, alpha):
    lora = loras(gpt2, 1)[0]
    with pytest.raises(ValueError, match="alpha"):
        with gpt2.trace(["Hello", "World"]):
            lora(alpha=alpha)


def test_a_kind_that_does_not_group_refuses_per_row_alphas(gpt2):
    from nnsight_toolbox import DoRA

    dora = DoRA(gpt2.transformer.h[0].mlp.c_fc, r=4)
    with pytest.raises(ValueError, match="one alpha per row is taken by `LORA` and `SteeringVector`, not by `DoRA`"):
        with gpt2.trace(["Hello", "World"]):
            dora(alpha=[1.0, 2.0])


def test_a_member_whose_positions_are_never_reached_still_raises(gpt2):
    vectors = [SteeringVector(gpt2.transformer.h[0]), SteeringVector(gpt2.transformer.h[0])]
    with pytest.raises(RuntimeError, match=r"never acted.*`positions=30`"):
        with gpt2.generate(max_new_tokens=2) as tracer:
            with tracer.invoke(PROMPTS[0]):
                vectors[0]()
            with tracer.invoke(PROMPTS[1]):
                vectors[1](positions=30)


def test_a_flattened_opt_layer_stays_correct(tmp_path, monkeypatch):
    seen = spy_groups(monkeypatch)
    model = families.load("opt", families.save("opt", tmp_path / "opt"))
    path = "model.decoder.layers.0.fc1"
    adapters = []
    for k in range(3):
        lora = LORA(model.get(path), r=4)
        families.randomize(lora, seed=k)
        adapters.append(lora)
    prompts = PROMPTS[:3]
    with model.trace() as tracer:
        for k in range(3):
            with tracer.invoke(prompts[k]):
                adapters[k](positions=-1 if k == 1 else None)
        with tracer.invoke():
            logits = model.output.logits.save()
    assert seen and all(done for _, done in seen)
    batch = batch_of(model, prompts)
    real = batch.attention_mask.bool()
    last = torch.zeros(real.shape[1])
    last[real_columns(real[1])[-1]] = 1.0
    deltas = [
        lora_delta(adapters[0].WA.detach(), adapters[0].WB.detach()),
        lora_delta(adapters[1].WA.detach(), adapters[1].WB.detach(), mask=last),
        lora_delta(adapters[2].WA.detach(), adapters[2].WB.detach()),
    ]
    with torch.no_grad(), per_row_hook(model._module.get_submodule(path), deltas):
        reference = model._module(**batch).logits
    for b in range(3):
        assert torch.allclose(logits[b][real[b]], reference[b][real[b]], atol=1e-5), b


def test_one_activation_takes_the_single_path(gpt2, monkeypatch):
    seen = spy_groups(monkeypatch)
    lora = loras(gpt2, 1)[0]
    with gpt2.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            lora()
        with tracer.invoke(PROMPTS[1]):
            pass
    with gpt2.trace(PROMPTS[0]):
        lora(positions=-1)
    assert seen == []


def test_switching_on_many_invokes_finds_each_adapter_by_dict(gpt2):
    adapters = loras(gpt2, 6)
    with gpt2.trace() as tracer:
        for k in range(6):
            with tracer.invoke(PROMPTS[k % 4]):
                adapters[k]()
                adapters[k](alpha=0.5)  # a repeat call updates, never applies twice
        with tracer.invoke():
            logits = gpt2.lm_head.output.save()
    prompts = []
    deltas = []
    for k in range(6):
        prompts.append(PROMPTS[k % 4])
        deltas.append(lora_delta(adapters[k].WA.detach(), adapters[k].WB.detach(), 0.5))
    with torch.no_grad(), per_row_hook(gpt2._module.get_submodule(PATH), deltas):
        reference = traced_logits(gpt2, prompts)
    assert torch.allclose(logits, reference, atol=1e-5)


def test_a_set_takes_per_row_alphas_for_every_member(gpt2):
    from nnsight_toolbox import LoraSet

    adapters = LoraSet.on(gpt2, ["c_attn"], r=4)
    for seed, lora in enumerate(adapters.values()):
        randomize(lora, seed=seed)
    prompts = ["Hello", "World", "abcde"]
    alphas = [0.5, 0.0, 2.0]
    with gpt2.trace(prompts):
        adapters(alpha=alphas)
        logits = gpt2.lm_head.output.save()
    with contextlib.ExitStack() as stack, torch.no_grad():
        for path, lora in adapters.items():
            deltas = []
            for alpha in alphas:
                deltas.append(lora_delta(lora.WA.detach(), lora.WB.detach(), alpha))
            stack.enter_context(per_row_hook(gpt2._module.get_submodule(path.split(".", 1)[1]), deltas))
        reference = raw_logits(gpt2, prompts)
    assert torch.allclose(logits, reference, atol=1e-5)
