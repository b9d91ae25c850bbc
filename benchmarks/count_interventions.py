"""Count what each intervention costs per call, against a bare torch hook computing the same formula.

For every intervention type of the package (LoRA, steering vector, LoReFT,
DiReFT, soft prompt), one greedy generation at batch 1 is counted under
callgrind three ways:

- ``toolbox``: the package as users write it (a set of interventions switched on
  inside ``model.generate``), every token;
- ``toolbox-positions``: the same with ``positions=`` (the last prompt token and
  every generated one; a soft prompt's own default, positions 0..n-1);
- ``hook``: plain torch forward hooks on the raw model, computing the same formula;
- ``nnsight-hook``: the same hooks on the raw modules inside the same nnsight
  generation, which is what an nnsight user would otherwise write.

Each intervention's per-call cost is its count minus the count of the same
generation without it (``nnsight-base`` for the package and ``nnsight-hook``,
``base`` for the hooks: nnsight's own per-module handoff is paid by any nnsight
trace, so it is taken out), divided by the number of intervention calls. Before
anything is counted, each variant's generated tokens must equal its hook's.
The package over ``nnsight-hook`` needs no base at all: both generate the same
tokens through the same nnsight, so their difference is what the package costs
over a hand-written hook, switch-on and prefill included.

A whole generation's count moves by up to about 0.4% between processes, a few thousand
instructions per call, which is a tenth of a steering vector's hook. So each call
is also counted alone (``isolated``): at the first generation step, the
intervened module's call is repeated `ISOLATED_CALLS` times with the package's
controller and with nnsight's own (the difference is the package's cost), and
the raw module the same number of times with the hook and without. Where the
root notes each pass (a soft prompt), each repeat is a pass: that note, then the
call. The switch-on and the prefill are left out; the whole generation keeps them. Run by hand, never as a test::

    python benchmarks/count_interventions.py            # about 30 minutes on 2 cores
    python benchmarks/count_interventions.py --check    # no valgrind: only the agreement check

One process does all the counting (import and model building happen once,
uninstrumented); each counted call is its own callgrind dump, as in `count.py`.
Writes ``benchmarks/results/count-interventions-<time>.jsonl`` and a ``.md`` table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: The model: `cpu-dispatch`'s shape (16 layers, 64 wide, 4096 tokens), so a call costs its dispatch.
LAYERS, HIDDEN, VOCAB = 16, 64, 4096
KINDS = ("lora", "steering", "loreft", "direft", "soft-prompt")
#: The issue's bar: an intervention's per-call cost is at most this many times its hook's.
BAR = 1.10
#: Repeats of one module call per isolated count: the per-call figure's noise is that of one dump over this.
ISOLATED_CALLS = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each counted generate produces (default 32)")
    parser.add_argument("--check", action="store_true", help="only check that every variant generates what its hook does")
    parser.add_argument("--repeats", type=int, default=3, help="count each call this many times and keep the median (default 3)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="the interventions to count (default: all)")
    parser.add_argument("--out", type=Path, help="JSON lines file (default: benchmarks/results/count-interventions-<time>.jsonl)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # the dump prefix, under callgrind
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# The interventions and their hooks
# ---------------------------------------------------------------------------


def build(kind: str, model, generator):
    """``(switch_on(positions), hooks, calls_per_pass, positions)`` for one intervention type.

    ``hooks`` is a list of ``(raw module, forward hook)`` computing the same formula
    with the same tensors; ``positions`` is what ``toolbox-positions`` passes.
    """
    import torch

    from nnsight_toolbox import DiReFT, InterventionSet, LoReFT, LORA, LoraSet, SoftPrompt, SteeringVector

    mlps = [model.model.layers[i].mlp for i in range(LAYERS)]
    raw = [m._module for m in mlps]

    def perturb(intervention):
        with torch.no_grad():
            for parameter in intervention.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
        return intervention

    if kind == "soft-prompt":
        soft = perturb(SoftPrompt(model.model.embed_tokens, n=4))
        vectors = soft.state_dict()[next(iter(soft.state_dict()))].detach().clone()

        def prompt_hook(module, args, output):
            if output.shape[1] == 1:  # a decode step: no placeholder here
                return output
            output = output.clone()
            output[:, : vectors.shape[0]] = vectors.to(output.dtype)
            return output

        return (lambda positions: soft(positions=positions)), [(model.model.embed_tokens._module, prompt_hook)], 1, None
    if kind == "lora":
        loras = LoraSet(perturb(LORA(m, r=16)) for m in mlps)
        hooks = [(r, _lora_hook(l.WA.detach(), l.WB.detach())) for r, l in zip(raw, loras.values())]
        return (lambda positions: loras(positions=positions)), hooks, LAYERS, slice(-1, None)
    if kind == "steering":
        steers = [perturb(SteeringVector(m)) for m in mlps]
        hooks = [(r, _steer_hook(s.v.detach().clone())) for r, s in zip(raw, steers)]
    else:
        cls = LoReFT if kind == "loreft" else DiReFT
        steers = [perturb(cls(m, r=4)) for m in mlps]
        hooks = []
        for r, s in zip(raw, steers):
            with torch.no_grad():
                Rt = s.rotate_layer.weight.detach().clone()  # (d, r), orthonormal columns
            W, b = s.learned_source.weight.detach().clone(), s.learned_source.bias.detach().clone()
            hooks.append((r, _reft_hook(Rt, W, b, subtract=kind == "loreft")))
    group = InterventionSet(steers)
    return (lambda positions: group(positions=positions)), hooks, LAYERS, slice(-1, None)


def _lora_hook(WA, WB):
    def hook(module, args, output):
        return output + args[0] @ WA @ WB

    return hook


def _steer_hook(v):
    def hook(module, args, output):
        return output + v

    return hook


def _reft_hook(Rt, W, b, subtract: bool):
    def hook(module, args, output):
        source = output @ W.T + b  # (B, T, r)
        if subtract:
            source = source - output @ Rt
        return output + source @ Rt.T

    return hook


@contextlib.contextmanager
def hooked(hooks):
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------
# The counted process
# ---------------------------------------------------------------------------


def calls_to_count(new_tokens: int, kinds: list[str] = KINDS, probes: dict | None = None):
    """``{name: (callable, context, calls per pass)}`` for every counted generation, each checked against its hook first.

    ``probes``, if given, receives ``{kind: (toolbox generate, hooks, root module)}`` for `count_isolated`.
    """
    import torch

    from nnsight_toolbox.testing import save_tiny_model
    from transformers import AutoTokenizer

    from nnsight import TransformersModel

    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = save_tiny_model("llama", Path(tempfile.mkdtemp()) / "llama", hidden=HIDDEN, layers=LAYERS, vocab_size=VOCAB, heads=4)
    model = TransformersModel(folder, task="text-generation", tokenizer=AutoTokenizer.from_pretrained(folder), dispatch=True)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (1, 16), generator=generator)
    settings = dict(max_new_tokens=new_tokens, do_sample=False)

    def nnsight_generate(switch_on=None, positions=None):
        with model.generate(prompt, **settings) as tracer:
            if switch_on is not None:
                switch_on(positions)
            ids = tracer.result.save()
        return ids

    def raw_generate():
        return model._module.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pad_token_id=VOCAB - 1, **settings)

    calls = {"nnsight-base": (nnsight_generate, contextlib.nullcontext, 0), "base": (raw_generate, contextlib.nullcontext, 0)}
    base_ids = raw_generate()
    for kind in kinds:
        switch_on, hooks, per_pass, positions = build(kind, model, generator)
        with hooked(hooks):
            expected = raw_generate()
        if torch.equal(expected, base_ids):
            raise SystemExit(f"{kind}: the hook changes nothing; perturb the weights more.")
        got = nnsight_generate(switch_on)
        if not torch.equal(got, expected):
            raise SystemExit(f"{kind}: the package generated {got.tolist()}, its hook {expected.tolist()}.")
        calls[f"{kind}:toolbox"] = ((lambda s=switch_on: nnsight_generate(s)), contextlib.nullcontext, per_pass)
        if positions is not None:
            calls[f"{kind}:toolbox-positions"] = ((lambda s=switch_on, p=positions: nnsight_generate(s, p)), contextlib.nullcontext, per_pass)
        calls[f"{kind}:hook"] = (raw_generate, (lambda h=hooks: hooked(h)), per_pass)
        with hooked(hooks):
            got = nnsight_generate()
        if not torch.equal(got, expected):
            raise SystemExit(f"{kind}: the hooks inside nnsight generated {got.tolist()}, outside {expected.tolist()}.")
        calls[f"{kind}:nnsight-hook"] = (nnsight_generate, (lambda h=hooks: hooked(h)), per_pass)
        if probes is not None:
            probes[kind] = ((lambda s=switch_on: nnsight_generate(s)), hooks, model._module)
    return calls


def count_isolated(kind: str, generate, hooks, root, dump, calls: int = ISOLATED_CALLS) -> None:
    """Dump ``<kind>:isolated-<variant>@<round>`` counts of one module call, repeated ``calls`` times.

    Variants: ``toolbox`` (the module's call while the package's intervention
    is live, at the first generation step), ``nnsight`` (nnsight's own controller
    of the same module, same step), ``hook`` (the raw module with the hook, outside
    nnsight) and ``raw`` (without). Where the root notes each pass (``positions=``,
    a soft prompt), each ``toolbox`` repeat is a pass of its own: the root's
    controller (its note of the pass and its review of the modules that may
    rest), then the module's call; each ``nnsight`` repeat is nnsight's root
    controller, then the module's. The model's forward itself is stubbed out of
    both root calls. A module whose interventions rest at that step (see
    `nnsight_toolbox.optim.standby`) is called through the forward it has then,
    nnsight's controller. ``dump(name, call)`` counts ``call()``.
    """
    import torch

    from nnsight_toolbox.optim.rows import NOTE

    module, hook = hooks[0]
    step: dict = {"module": 0, "root": 0}

    def root_at_first_step(root, args, kwargs):  # a pre-hook: runs before the root's controller notes the pass
        step["root"] += 1
        controller = root.__dict__["forward"]
        if step["root"] == 2 and getattr(controller, "noting", None) is not None:
            if controller.activations:
                raise SystemExit(f"{kind}: the root carries an intervention; its call cannot be stubbed out.")
            step["root_call"] = (controller, args, kwargs)
            step["notes"] = controller.noting_for().__dict__[NOTE]

    def at_first_step(module, args):  # a pre-hook: the package's controller is the module's forward now
        step["module"] += 1
        if step["module"] != 2:  # pass 0 is the prompt, pass 1 the first generated token
            return
        forward, x = module.__dict__["forward"], args[0]
        inner = getattr(forward, "inner", None)
        if inner is None:  # resting: the package handed the module back to nnsight for this run
            standby = step.get("notes", {}).get("standby")
            if standby is None or not any(c.module_ref() is module for c in standby.resting):
                raise SystemExit(f"{kind}: the intervention is not live on the module's call at the first generation step.")
            inner = forward
        root_call = step.get("root_call")
        if root_call is None:
            dump(f"{kind}:isolated-toolbox", lambda: _repeat(forward, x, calls))
            dump(f"{kind}:isolated-nnsight", lambda: _repeat(inner, x, calls))
        else:
            controller, root_args, root_kwargs = root_call
            state, root_inner = controller.state, controller.inner  # one `State`: the package's and nnsight's controller share it
            kept, body = dict(step["notes"]), state.body  # the run's own, put back after
            state.body = _stub  # the model's forward itself, the same in both variants

            def toolbox():
                for _ in range(calls):
                    controller(*root_args, **root_kwargs)
                    forward(x)

            def nnsight():
                for _ in range(calls):
                    root_inner(*root_args, **root_kwargs)
                    inner(x)

            try:
                dump(f"{kind}:isolated-toolbox", toolbox)
                dump(f"{kind}:isolated-nnsight", nnsight)
            finally:
                state.body = body
                step["notes"].clear()
                step["notes"].update(kept)
        step["x"] = x

    handles = [module.register_forward_pre_hook(at_first_step), root.register_forward_pre_hook(root_at_first_step, with_kwargs=True)]
    try:
        generate()
    finally:
        for handle in handles:
            handle.remove()
    if "x" not in step:
        raise SystemExit(f"{kind}: no generation step to count a call at; pass --new-tokens 2 or more.")
    x = step["x"]
    with torch.no_grad():
        for name in ("hook", "raw"):
            with hooked([(module, hook)] if name == "hook" else []):
                dump(f"{kind}:isolated-{name}", lambda: _repeat(module, x, calls))


def _stub(module, *args, **kwargs) -> None:
    """Stands in for the model's forward while the root controllers' own per-pass work is counted."""


def _repeat(call, x, times: int) -> None:
    for _ in range(times):
        call(x)


def count_in_worker(prefix: Path, new_tokens: int, kinds: list[str], repeats: int) -> None:
    import gc

    from count import callgrind_control

    probes: dict = {}
    calls = calls_to_count(new_tokens, kinds, probes)
    prefix.with_suffix(".json").write_text(json.dumps({name: per_pass for name, (_, _, per_pass) in calls.items()}))
    for call, context, _ in calls.values():  # uninstrumented warm-up
        with context():
            call()
    gc.collect()
    gc.freeze()
    gc.disable()
    callgrind_control("-i", "on")
    for repeat in range(repeats):  # rounds over every call: each call's median is kept (see `median_counts`)
        for name, (call, context, _) in calls.items():
            with context():
                if repeat == 0:
                    call()  # once instrumented, so that translating the code is not counted
                sys.call_tracing(call, ())
            callgrind_control(f"--dump={name}@{repeat}")

    for repeat in range(repeats):  # the isolated counts (see `count_isolated`), in rounds too
        for kind, (generate, hooks, root) in probes.items():
            count_isolated(kind, generate, hooks, root, lambda name, call, r=repeat: _dump(f"{name}@{r}", call))


def _dump(name: str, call) -> None:
    """Count ``call()`` as dump ``name``, after one uncounted run (the interpreter specialises code on its first runs)."""
    from count import callgrind_control

    call()
    sys.call_tracing(call, ())
    callgrind_control(f"--dump={name}")


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


def median_counts(dumps: dict[str, int]) -> dict[str, int]:
    """``{call: instructions}``, the median of each call's rounds (dumps named ``call@round``).

    The same generation counted in two rounds of one process differs by up to
    about 800k instructions (the allocator's and the interpreter's state drift
    between rounds), which at 8 tokens is several thousand per intervention call.
    The median of a few interleaved rounds is each call's cost with the least of that noise.

    Examples:
        >>> median_counts({"hook@0": 120, "hook@1": 100, "hook@2": 101, "base@0": 90})
        {'hook': 101, 'base': 90}
    """
    rounds: dict[str, list[int]] = {}
    for dump, instructions in dumps.items():
        rounds.setdefault(dump.rsplit("@", 1)[0], []).append(instructions)
    return {name: sorted(counts)[len(counts) // 2] for name, counts in rounds.items()}


def records_of(counts: dict[str, int], per_pass: dict[str, int], new_tokens: int) -> list[dict]:
    """Per kind and variant: instructions, and the cost per intervention call over its base."""
    records = []
    for name, instructions in counts.items():
        if ":" not in name:
            records.append(dict(measure="instructions", variant=name, instructions=instructions))
            continue
        kind, variant = name.split(":")
        if variant.startswith("isolated-"):
            continue
        base = counts["base" if variant == "hook" else "nnsight-base"]
        per_call = (instructions - base) / (per_pass[name] * new_tokens)
        records.append(dict(measure="instructions", kind=kind, variant=variant, instructions=instructions, per_call=round(per_call)))
    for kind in KINDS:
        by_variant = {r["variant"]: r["per_call"] for r in records if r.get("kind") == kind}
        if "toolbox" in by_variant and "hook" in by_variant:
            ratio = dict(measure="ratio_to_hook", kind=kind, toolbox=round(by_variant["toolbox"] / by_variant["hook"], 3))
            if f"{kind}:nnsight-hook" in counts:  # same tokens, same nnsight: no base needed
                calls = per_pass[f"{kind}:toolbox"] * new_tokens
                ratio["over_nnsight_hook_per_call"] = round((counts[f"{kind}:toolbox"] - counts[f"{kind}:nnsight-hook"]) / calls)
            if "toolbox-positions" in by_variant:
                ratio["toolbox_positions"] = round(by_variant["toolbox-positions"] / by_variant["hook"], 3)
                ratio["positions_extra_per_call"] = by_variant["toolbox-positions"] - by_variant["toolbox"]
            isolated = {v: counts.get(f"{kind}:isolated-{v}") for v in ("toolbox", "nnsight", "hook", "raw")}
            if None not in isolated.values():
                toolbox_call = (isolated["toolbox"] - isolated["nnsight"]) / ISOLATED_CALLS
                hook_call = (isolated["hook"] - isolated["raw"]) / ISOLATED_CALLS
                ratio.update(isolated_toolbox=round(toolbox_call), isolated_hook=round(hook_call), isolated_ratio=round(toolbox_call / hook_call, 3))
            ratio["within_bar"] = ratio["toolbox"] <= BAR and ratio.get("isolated_ratio", 0) <= BAR
            records.append(ratio)
    return records


def markdown(meta: dict, records: list[dict]) -> str:
    per_call = {(r["kind"], r["variant"]): r["per_call"] for r in records if "per_call" in r}
    ratios = {r["kind"]: r for r in records if r["measure"] == "ratio_to_hook"}
    lines = [
        f"### Per-call cost of each intervention against a bare torch hook (instructions; `{meta['model']}`, "
        f"generate {meta['new_tokens']} tokens at batch 1)",
        "",
        "| intervention | hook (k/call) | toolbox (k/call) | toolbox / hook | toolbox - hook, both in nnsight (k/call) | one call alone: hook, toolbox (k) | alone: toolbox / hook | with `positions=` (k/call) | `positions=` extra (k/call) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in KINDS:
        if (kind, "hook") not in per_call:
            continue
        ratio = ratios[kind]
        with_positions = per_call.get((kind, "toolbox-positions"))
        positioned = "-" if with_positions is None else f"{with_positions / 1e3:,.1f}"
        extra = "-" if with_positions is None else f"{ratio['positions_extra_per_call'] / 1e3:,.1f}"
        hook, toolbox = per_call[(kind, "hook")] / 1e3, per_call[(kind, "toolbox")] / 1e3
        alone, alone_ratio = "-", "-"
        if "isolated_ratio" in ratio:
            alone = f"{ratio['isolated_hook'] / 1e3:,.1f}, {ratio['isolated_toolbox'] / 1e3:,.1f}"
            alone_ratio = f"{ratio['isolated_ratio']:.3f}x"
        over = ratio.get("over_nnsight_hook_per_call")
        over = "-" if over is None else f"{over / 1e3:+,.1f}"
        lines.append(f"| {kind} | {hook:,.1f} | {toolbox:,.1f} | {ratio['toolbox']:.3f}x | {over} | {alone} | {alone_ratio} | {positioned} | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    if args.worker:
        count_in_worker(args.worker, args.new_tokens, args.kinds, args.repeats)
        return None
    if args.check:
        calls = calls_to_count(args.new_tokens, args.kinds)
        print(f"every variant generates what its hook does ({len(calls) - 2} counted calls would follow)")
        return None
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not found: counting needs valgrind (`apt-get install valgrind`).")
    from count import read_dumps, run_under_callgrind
    from report import write_results

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / f"count-interventions-{stamp}.jsonl"
    with tempfile.TemporaryDirectory() as work:
        prefix = Path(work) / "interventions.callgrind"
        done = run_under_callgrind(prefix, Path(__file__).resolve(), "--worker", str(prefix), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--kinds", *args.kinds)
        counts = median_counts(read_dumps(prefix))
        if done.returncode != 0 or not counts:
            raise SystemExit(f"Counting failed:\n{(done.stdout + done.stderr)[-4000:]}")
        per_pass = json.loads(prefix.with_suffix(".json").read_text())
    meta = dict(measure="meta", kind="instructions", model=f"Llama, {LAYERS} layers, {HIDDEN} wide, vocabulary {VOCAB}", new_tokens=args.new_tokens, date=stamp)
    records = [meta, *records_of(counts, per_pass, args.new_tokens)]
    write_results(out, records, markdown(meta, records))
    return out


if __name__ == "__main__":
    main()
