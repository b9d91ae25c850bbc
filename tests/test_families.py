"""Families whose layouts break naive assumptions: correct where the layout is known, refused where not.

- OPT and Qwen2-MoE's shared expert flatten (B, T, H) to (B*T, H): per-invoke rows work.
- A Switch Transformers expert sees only its routed tokens: per-invoke rows are
  refused (even when it gets exactly B tokens), the whole batch works.
- T5 has an encoder and a decoder length: per-invoke generation works on both sides,
  and `steps=` counts the encoder's one run in the first pass.
- BERT has submodules named ``output``: every path-based entry point reaches them.

The reference is a plain torch forward hook on the raw module (`families.row_hook`)
that knows each layout by construction.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import families
from conftest import forwards_seen
from nnsight_toolbox import LORA, LoraSet, export_peft, import_peft
from nnsight_toolbox.optim.rows import layout_error, row_span

PROMPTS = ["The Eiffel Tower is in", "Hi"]


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: families.save(family, root / family) for family in families.FAMILIES}


def load(family_paths, family):
    return families.load(family, family_paths[family])


def raw(model, path):
    return model._module.get_submodule(path)


def batch_of(model, prompts):
    return model.tokenizer(prompts, return_tensors="pt", padding=True)


# -- flattened rows: OPT's fc1, Qwen2-MoE's shared expert ----------------------------

FLATTENED = [("opt", "model.decoder.layers.0.fc1"), pytest.param("qwen2_moe", "model.layers.0.mlp.shared_expert", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family,path", FLATTENED)
def test_flattened_rows_are_scoped_per_invoke_in_a_trace(family_paths, family, path):
    model = load(family_paths, family)
    lora = LORA(model.get(path), r=4)
    families.randomize(lora)
    with model.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            lora()
        with tracer.invoke(PROMPTS[1]):
            pass
        with tracer.invoke():
            logits = model.output.logits.save()
    batch = batch_of(model, PROMPTS)
    with torch.no_grad():
        base = model._module(**batch).logits
        with families.row_hook(raw(model, path), lora.WA.detach(), lora.WB.detach(), batch=2, rows=[0]):
            reference = model._module(**batch).logits
    real = batch.attention_mask.bool()  # pad positions are not compared: nnsight and HF place them differently
    torch.testing.assert_close(logits[real], reference[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0][real[0]], base[0][real[0]], atol=1e-3), "the adapter must change its own row"
    torch.testing.assert_close(logits[1][real[1]], base[1][real[1]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,path", FLATTENED)
def test_flattened_rows_are_scoped_per_invoke_at_every_generation_step(family_paths, family, path):
    model = load(family_paths, family)
    lora = LORA(model.get(path), r=4)
    families.randomize(lora, scale=3.0)
    with model.generate(max_new_tokens=5, do_sample=False) as tracer:
        with tracer.invoke(PROMPTS[0]):
            lora()
        with tracer.invoke(PROMPTS[1]):
            pass
        with tracer.invoke():
            ids = tracer.result.save()
    batch = batch_of(model, PROMPTS)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    base = model._module.generate(**batch, **settings)
    with families.row_hook(raw(model, path), lora.WA.detach(), lora.WB.detach(), batch=2, rows=[0]):
        reference = model._module.generate(**batch, **settings)
    assert torch.equal(ids, reference)
    assert not torch.equal(reference[0], base[0]), "the adapter must change its own row's tokens"
    assert torch.equal(reference[1], base[1])


# -- routed experts: refused per invoke, fine for the whole batch -------------------

EXPERTS = [f"encoder.block.{block}.layer.1.mlp.experts.expert_{k}" for block in (0, 1) for k in range(4)]


def routed_counts(model, prompts):
    """How many tokens each encoder expert receives for ``prompts``, and the padded length."""
    counts = {}
    handles = [
        raw(model, path).register_forward_hook(lambda mod, args, out, path=path: counts.__setitem__(path, args[0].shape[0]))
        for path in EXPERTS
    ]
    batch = batch_of(model, prompts)
    try:
        with torch.no_grad():
            model._module.get_encoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return counts, batch.input_ids.shape[1]


@pytest.mark.slow
def test_a_routed_expert_is_refused_per_invoke_even_with_exactly_batch_size_tokens(family_paths):
    model = load(family_paths, "switch")
    candidates = ["ab", "xyz", "hello", "zz", "Paris", "The cat", "qq qq", "a"]
    found = None
    for pair in itertools.combinations(candidates, 2):
        counts, length = routed_counts(model, list(pair))
        hit = next((path for path, n in counts.items() if n == 2), None)
        if hit is not None and length > 1:
            found = pair, hit
            break
    assert found is not None, "no prompt pair routes exactly 2 tokens to one expert; widen the candidates"
    (first, second), path = found
    lora = LORA(model.get(path), r=4)
    families.randomize(lora)
    with pytest.raises(ValueError, match="Cannot scope the adapter") as error:
        with model.generate(max_new_tokens=1, do_sample=False) as tracer:
            with tracer.invoke(first):
                lora()
            with tracer.invoke(second):
                pass
    message = str(error.value)
    assert path in message and "(2, 32)" in message and "empty `tracer.invoke()`" in message
    assert "num_beams" not in message, "the error must not blame an option that was not passed"


@pytest.mark.slow
def test_a_routed_expert_adapts_the_whole_batch_from_an_empty_invoke(family_paths):
    model = load(family_paths, "switch")
    path = "encoder.block.1.layer.1.mlp.experts.expert_0"
    lora = LORA(model.get(path), r=4)
    families.randomize(lora, scale=3.0)
    with model.generate(max_new_tokens=4, do_sample=False) as tracer:
        with tracer.invoke(PROMPTS[0]):
            pass
        with tracer.invoke(PROMPTS[1]):
            pass
        with tracer.invoke():
            lora()
            ids = tracer.result.save()
    batch = batch_of(model, PROMPTS)
    settings = dict(max_new_tokens=4, do_sample=False)
    base = model._module.generate(**batch, **settings)
    with families.row_hook(raw(model, path), lora.WA.detach(), lora.WB.detach(), batch=2, rows=None):
        reference = model._module.generate(**batch, **settings)
    assert torch.equal(ids, reference)
    assert not torch.equal(reference, base), "the adapter must change the generation"


# -- encoder-decoder: two sequence lengths ------------------------------------------


def t5_with_adapters(family_paths):
    """Tiny T5, the paths of an encoder and a decoder module, and a random LoRA on each."""
    model = load(family_paths, "t5")
    paths = ["encoder.block.0.layer.1.DenseReluDense.wi", "decoder.block.1.layer.2.DenseReluDense.wo"]
    adapters = LoraSet(LORA(model.get(path), r=4) for path in paths)
    for seed, lora in enumerate(adapters.values()):
        families.randomize(lora, seed=seed, scale=3.0)
    return model, paths, adapters


@pytest.mark.slow  # generation on T5
def test_t5_generation_scopes_encoder_and_decoder_adapters_per_invoke(family_paths):
    model, paths, adapters = t5_with_adapters(family_paths)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)  # tiny T5 would stop at EOS at once
    with model.generate(**settings) as tracer:
        with tracer.invoke(PROMPTS[0]):
            pass
        with tracer.invoke(PROMPTS[1]):
            adapters()
        with tracer.invoke():
            ids = tracer.result.save()
    batch = batch_of(model, PROMPTS)
    base = model._module.generate(**batch, **settings)
    with families.row_hook(raw(model, paths[0]), *(t.detach() for t in (adapters[f"model.{paths[0]}"].WA, adapters[f"model.{paths[0]}"].WB)), batch=2, rows=[1]):
        with families.row_hook(raw(model, paths[1]), *(t.detach() for t in (adapters[f"model.{paths[1]}"].WA, adapters[f"model.{paths[1]}"].WB)), batch=2, rows=[1]):
            reference = model._module.generate(**batch, **settings)
    assert torch.equal(ids, reference)
    assert not torch.equal(reference[1], base[1]), "the adapters must change their row's tokens"
    assert torch.equal(reference[0], base[0])


@pytest.mark.slow  # generation on T5
def test_t5_steps_count_the_encoder_in_the_first_pass_and_retire_after_it(family_paths):
    """``steps=0``: the encoder's one run and the decoder's first pass, then the decoder module runs nnsight's controller."""
    model, paths, adapters = t5_with_adapters(family_paths)
    (enc_A, enc_B), (dec_A, dec_B) = ((lora.WA.detach(), lora.WB.detach()) for lora in adapters.values())
    # Each step's scores, not only the tokens: tiny T5's greedy tokens barely move.
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    decoder = raw(model, paths[1])
    with forwards_seen(decoder) as kinds, model.generate(PROMPTS, **settings) as tracer:
        adapters(steps=0)
        ours = tracer.result.save()
    assert kinds == ["package", "package", "nnsight", "nnsight"]

    batch = batch_of(model, PROMPTS)

    def decoder_generate(passes):
        """HF generate with the encoder's delta and the decoder's on the passes ``passes`` picks (by call count)."""
        calls = []

        def hook(mod, args, output):
            calls.append(None)
            return output + args[0] @ dec_A @ dec_B if passes(len(calls) - 1) else None

        handle = decoder.register_forward_hook(hook)
        try:
            with families.row_hook(raw(model, paths[0]), enc_A, enc_B, batch=2):
                return model._module.generate(**batch, **settings)
        finally:
            handle.remove()

    reference = decoder_generate(lambda p: p == 0)
    assert torch.equal(ours.sequences, reference.sequences)
    for got, want in zip(ours.scores, reference.scores, strict=True):
        torch.testing.assert_close(got, want)
    every, never = decoder_generate(lambda p: True), decoder_generate(lambda p: False)
    assert not torch.allclose(reference.scores[1], every.scores[1]), "a decoder adapted at pass 1 must differ"
    assert not torch.allclose(reference.scores[0], never.scores[0]), "the decoder's first pass must matter"

# -- BERT: modules named `output` ---------------------------------------------------


@pytest.mark.slow
def test_bert_output_dense_is_reached_by_lora_on_and_computes_what_hooks_do(family_paths, tmp_path):
    model = load(family_paths, "bert")
    adapters = LORA.on(model, ["output.dense"], r=4)
    assert list(adapters) == [
        "model.bert.encoder.layer.0.attention.output.dense",
        "model.bert.encoder.layer.0.output.dense",
        "model.bert.encoder.layer.1.attention.output.dense",
        "model.bert.encoder.layer.1.output.dense",
    ]
    for seed, lora in enumerate(adapters.values()):
        families.randomize(lora, seed=seed)
    prompt = "Paris is the <mask> of France."
    with model.trace(prompt):
        adapters()
        logits = model.output.logits.save()
    batch = batch_of(model, [prompt])
    with torch.no_grad():
        base = model._module(**batch).logits
        import contextlib

        with contextlib.ExitStack() as stack:
            for path, lora in adapters.items():
                stack.enter_context(families.row_hook(raw(model, path.split(".", 1)[1]), lora.WA.detach(), lora.WB.detach(), batch=1))
            reference = model._module(**batch).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, base, atol=1e-3)

    adapters.save(tmp_path / "set")
    restored = LoraSet.load(tmp_path / "set", load(family_paths, "bert"))
    assert list(restored) == list(adapters)
    assert all(torch.equal(restored[p].WB, adapters[p].WB) for p in adapters)


@pytest.mark.slow
def test_bert_peft_adapter_on_query_and_dense_imports(family_paths, tmp_path):
    peft = pytest.importorskip("peft")
    model = load(family_paths, "bert")
    adapters = LORA.on(model, ["query", "dense"], r=4)
    for seed, lora in enumerate(adapters.values()):
        families.randomize(lora, seed=seed, scale=0.2)
    export_peft(adapters, tmp_path / "peft")
    imported = import_peft(load(family_paths, "bert"), tmp_path / "peft")
    assert sorted(imported) == sorted(adapters)

    hf = families.config("bert")[1].from_pretrained(family_paths["bert"])
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    prompt = "Paris is the <mask> of France."
    with model.trace(prompt):
        adapters()
        logits = model.output.logits.save()
    with torch.no_grad():
        expected = peft_model(**batch_of(model, [prompt])).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# -- widths of blocks in every family ------------------------------------------------

BLOCKS = [
    ("t5", "encoder.block.0"),
    ("t5", "decoder.block.1.layer.1"),
    ("bart", "model.encoder.layers.0"),
    ("bert", "bert.encoder.layer.0"),
    ("qwen2_moe", "model.layers.0.input_layernorm"),
    ("switch", "encoder.block.0"),
    ("opt", "model.decoder.layers.0"),
]


@pytest.mark.slow  # a sweep of families
@pytest.mark.parametrize("family,path", BLOCKS)
def test_widths_of_a_block_resolve_in_every_family(family_paths, family, path):
    model = load(family_paths, family)
    lora = LORA(model.get(path), r=4)
    assert (lora.input_dim, lora.output_dim) == (32, 32)


def test_widths_of_a_block_resolve_on_a_model_whose_weights_are_not_loaded(model_paths):
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    path = model_paths["llama"]
    model = TransformersModel(path, task="text-generation", tokenizer=AutoTokenizer.from_pretrained(path))
    assert next(model._module.parameters()).is_meta
    lora = LORA(model.model.layers[0], r=4)
    assert (lora.input_dim, lora.output_dim) == (32, 32)


def test_building_a_block_adapter_inside_a_trace_says_to_build_it_before(family_paths):
    model = load(family_paths, "opt")
    with pytest.raises(RuntimeError, match="Build the `LORA` before the trace"):
        with model.trace("Hello"):
            LORA(model.model.decoder.layers[0], r=4)


def test_a_layer_adapter_can_still_be_built_inside_a_trace(family_paths):
    model = load(family_paths, "opt")
    built = []
    with model.trace("Hello"):
        lora = LORA(model.model.decoder.layers[0].fc1, r=4)
        built.append(lora)
        with torch.no_grad():
            lora.WB.fill_(0.5)  # a fresh adapter changes nothing: make this one act
        lora()
        logits = model.output.logits.save()
    with model.trace("Hello"):
        base = model.output.logits.save()
    assert (built[0].input_dim, built[0].output_dim) == (32, 96)
    assert not torch.allclose(logits, base, atol=1e-3), "the adapter built inside the trace must act in it"


# -- an open loop that never waits -----------------------------------------------------


def test_a_loop_that_only_calls_the_adapter_is_stopped_with_the_working_forms(family_paths):
    model = load(family_paths, "opt")
    lora = LORA(model.model.decoder.layers[0].fc1, r=4)
    with pytest.raises(RuntimeError, match="never waits for the model") as error:
        with model.generate("Hi", max_new_tokens=2) as tracer:
            for _ in tracer.all():
                lora()
    assert "call `lora()` once" in str(error.value) and ".save()" in str(error.value)
    # the two working forms
    with model.generate("Hi", max_new_tokens=2) as tracer:
        lora()
        once = tracer.result.save()
    with model.generate("Hi", max_new_tokens=2) as tracer:
        steps = list().save()
        for _ in tracer.all():
            lora()
            steps.append(model.output.logits[:, -1].argmax(-1))
    assert once.shape[1] > 0 and len(steps) == 2


# -- the layout rule itself -------------------------------------------------------------


def test_row_span_accepts_only_established_layouts():
    lengths = frozenset({5})
    assert row_span(torch.zeros(2, 5, 8), 2, lengths) == 1  # batch-first
    assert row_span(torch.zeros(10, 8), 2, lengths) == 5  # flattened batch-major
    assert row_span(torch.zeros(2, 5, dtype=torch.long), 2, lengths) == 1  # token ids (B, T)
    assert row_span(torch.zeros(2, 8), 2, lengths) is None  # 2 routed tokens while T = 5
    assert row_span(torch.zeros(2, 8), 2, frozenset({1})) == 1  # one token per row: a decode step
    assert row_span(torch.zeros(7, 8), 2, lengths) is None  # a routed subset
    assert row_span(torch.zeros(5, 2, 8), 2, lengths) is None  # time-first (T, B, H), T != B
    assert row_span(torch.zeros(2, 8), 2, frozenset()) is None  # no known length: not established


def test_the_layout_error_names_beam_options_only_when_given():
    x, out = torch.zeros(6, 8), torch.zeros(6, 8)
    assert "num_beams" not in str(layout_error("m.fc1", x, out, 2, frozenset({5}), {"max_new_tokens": 3}))
    assert "`num_beams=4`" in str(layout_error("m.fc1", x, out, 2, frozenset({5}), {"num_beams": 4}))
