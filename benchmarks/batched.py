"""Many interventions in one batch: K rows, each its own LoRA set or steering vectors, in one forward.

Run by hand, never as a test::

    python benchmarks/batched.py                                  # K = 1, 4, 16, 64; about 10 minutes on one core
    python benchmarks/batched.py --baseline-src /work/main/src    # also time another checkout's package, side by side

One forward of K rows x 16 tokens of a 64-wide, 16-layer GPT-2 built from
config (random weights, vocabulary 4096: `configs.py`'s ``cpu-dispatch-gpt2``
model). Two kinds:

- **lora**: row k gets its own set of r=16 adapters on every ``c_attn``, switched
  on in its own invoke (``sets[k]()``), against (a) **one set** on the same K
  rows in one invoke, (b) **peft-mixed**: PEFT's ``PeftModel`` with the K adapters
  loaded, ``forward(ids, adapter_names=[...])``, outside nnsight, and (c) **hook**:
  a plain torch forward hook per ``c_attn`` computing the gathered delta
  ``x @ WA[k] @ WB[k]`` per row with ``torch.bmm``, on the raw model;
- **steering**: row k gets its own vector on every block's output, against one
  vector set on all K rows and the gathered hook (PEFT has no steering vectors).

Before timing, every row's logits are compared with PEFT's and the hook's
(``torch.allclose``); a mismatch stops the run. Timing: process CPU time, one
torch thread, rounds interleaved (`timing.time_interleaved`), median.
``--baseline-src`` loads a second copy of the package from that source tree
(renamed, on its own copy of the model) and times it beside this one.

Writes ``benchmarks/reports/batched-cpu.jsonl``, ``.md`` and ``batched-cpu.png``
(``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from configs import CONFIGS  # noqa: E402
from report import paired_ratio  # noqa: E402
from run import device_name, versions  # noqa: E402
from timing import time_interleaved  # noqa: E402
from variants import adapter_init, build_models  # noqa: E402

REPORTS = Path(__file__).resolve().parent / "reports"
TOKENS = 16
R = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64], help="how many interventions (one per row)")
    parser.add_argument("--kinds", nargs="+", default=["lora", "steering"], choices=["lora", "steering"])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per K")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPORTS / "batched-cpu", help="stem of the .jsonl/.md/.png")
    parser.add_argument("--baseline-src", type=Path, help="a source tree (its nnsight_toolbox) to time beside this one")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def load_baseline(src: Path):
    """``nnsight_toolbox`` from ``src``, copied and renamed so that both versions live in one process."""
    folder = Path(tempfile.mkdtemp(prefix="toolbox-baseline-"))
    target = folder / "nnsight_toolbox_baseline"
    shutil.copytree(src / "nnsight_toolbox", target)
    for path in target.rglob("*.py"):
        path.write_text(path.read_text().replace("nnsight_toolbox", "nnsight_toolbox_baseline"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("nnsight_toolbox_baseline")


# ---------------------------------------------------------------------------
# The variants: each a function of no arguments returning the (K, T, vocab) logits
# ---------------------------------------------------------------------------


def side_by_side(model, sets: list, ids: torch.Tensor):
    """Two calls to time: row k in its own invoke with ``sets[k]`` switched on, and ``sets[0]`` on every row in one invoke."""
    rows = [ids[k : k + 1] for k in range(ids.shape[0])]

    def grouped():
        with torch.no_grad(), model.trace() as tracer:
            for k in range(len(rows)):
                with tracer.invoke(rows[k]):
                    sets[k]()
            with tracer.invoke():
                logits = model.lm_head.output.save()
        return logits

    def one_set():
        with torch.no_grad(), model.trace(ids):
            sets[0]()
            logits = model.lm_head.output.save()
        return logits

    return grouped, one_set


def toolbox_lora(package, model, weights: list[dict], ids: torch.Tensor):
    """K invokes, row k switching on its own set: the package as users write it."""
    sets = []
    for init in weights:
        adapters = package.LORA.on(model, ["c_attn"], r=R)
        with torch.no_grad():
            for path, (a, b) in init.items():
                adapters[path].WA.copy_(a)
                adapters[path].WB.copy_(b)
        sets.append(adapters)
    return side_by_side(model, sets, ids)


def toolbox_steering(package, model, vectors: list[torch.Tensor], ids: torch.Tensor):
    """K invokes, row k switching on its own vector on every block (an `InterventionSet`)."""
    layers = len(model.transformer.h)
    sets = []
    for per_layer in vectors:
        members = []
        for layer in range(layers):
            vector = package.SteeringVector(model.transformer.h[layer], output_dim=per_layer.shape[-1])
            with torch.no_grad():
                vector.v.copy_(per_layer[layer])
            members.append(vector)
        sets.append(package.InterventionSet(members))
    return side_by_side(model, sets, ids)


def peft_mixed(raw: torch.nn.Module, weights: list[dict], ids: torch.Tensor):
    """PEFT's mixed-adapter batch: K adapters loaded, ``adapter_names=`` one per row."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=R, target_modules=list(weights[0]), lora_dropout=0.0)  # scale 1
    model = get_peft_model(copy.deepcopy(raw), config, adapter_name="a0")
    for k in range(1, len(weights)):
        model.add_adapter(f"a{k}", config)
    with torch.no_grad():
        for k, init in enumerate(weights):
            for path, (a, b) in init.items():
                layer = model.base_model.model.get_submodule(path)
                layer.lora_A[f"a{k}"].weight.copy_(a.T)
                layer.lora_B[f"a{k}"].weight.copy_(b.T)
    model.eval()
    names = [f"a{k}" for k in range(len(weights))]

    def forward():
        with torch.no_grad():
            return model(ids, adapter_names=names).logits

    return forward


def hook_lora(raw: torch.nn.Module, weights: list[dict], ids: torch.Tensor):
    """A plain forward hook per ``c_attn``: ``out + bmm(bmm(x, WA[k]), WB[k])`` per row."""
    stacks = {path: (torch.stack([w[path][0] for w in weights]), torch.stack([w[path][1] for w in weights])) for path in weights[0]}

    def make(WA, WB):
        def hook(module, args, output):
            return torch.baddbmm(output, torch.bmm(args[0], WA), WB)

        return hook

    def forward():
        handles = [raw.get_submodule(path).register_forward_hook(make(*stacks[path])) for path in stacks]
        try:
            with torch.no_grad():
                return raw(ids).logits
        finally:
            for handle in handles:
                handle.remove()

    return forward


def hook_steering(raw: torch.nn.Module, vectors: list[torch.Tensor], ids: torch.Tensor):
    """A plain forward hook per block: ``out + V[k]`` per row."""
    stacked = torch.stack(vectors)  # (K, layers, d)

    def make(V):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + V[:, None, :], *output[1:])
            return output + V[:, None, :]

        return hook

    def forward():
        handles = [raw.transformer.h[layer].register_forward_hook(make(stacked[:, layer])) for layer in range(stacked.shape[1])]
        try:
            with torch.no_grad():
                return raw(ids).logits
        finally:
            for handle in handles:
                handle.remove()

    return forward


def check_agreement(kind: str, k: int, results: dict[str, torch.Tensor], reference: str) -> dict:
    """Every variant but the one-set one against ``reference``, row by row; raises on a mismatch."""
    ref = results[reference]
    worst = {}
    for name, logits in results.items():
        if name.startswith("one-set") or name == reference:
            continue
        if logits.shape != ref.shape or not torch.allclose(logits, ref, atol=1e-4, rtol=1e-4):
            diff = (logits - ref).abs().max().item() if logits.shape == ref.shape else float("nan")
            raise SystemExit(f"{kind} K={k}: `{name}` disagrees with `{reference}` (max |diff| {diff:.3g}, shapes {tuple(logits.shape)} / {tuple(ref.shape)}); nothing was timed.")
        worst[name] = float((logits - ref).abs().max())
    return worst


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import nnsight_toolbox

    baseline = load_baseline(args.baseline_src) if args.baseline_src is not None else None
    config = CONFIGS["cpu-dispatch-gpt2"]
    models = build_models(config)
    raw, model = models.raw, models.nnsight
    other = None
    if baseline is not None:
        from nnsight import LanguageModel

        other = LanguageModel(copy.deepcopy(raw), tokenizer=model.tokenizer)
    d, layers, vocab = config.model["n_embd"], config.model["n_layer"], config.model["vocab_size"]
    records = [dict(measure="meta", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device_name("cpu"), threads=1, clock="cpu", tokens=TOKENS, r=R, model=config.model, versions=versions(), baseline=str(args.baseline_src) if baseline else None)]
    generator = torch.Generator().manual_seed(0)
    for kind in args.kinds:
        for k in args.ks:
            ids = torch.randint(0, vocab, (k, TOKENS), generator=generator)
            calls = {}
            if kind == "lora":
                weights = [adapter_init(model, ["c_attn"], R, seed=seed).weights for seed in range(k)]
                calls["toolbox"], calls["one-set"] = toolbox_lora(nnsight_toolbox, model, weights, ids)
                if baseline is not None:
                    calls["toolbox-baseline"], calls["one-set-baseline"] = toolbox_lora(baseline, other, weights, ids)
                calls["peft-mixed"] = peft_mixed(raw, weights, ids)
                calls["hook"] = hook_lora(raw, weights, ids)
                reference = "peft-mixed"
            else:
                vectors = [torch.randn(layers, d, generator=generator) * 0.5 for _ in range(k)]
                calls["toolbox"], calls["one-set"] = toolbox_steering(nnsight_toolbox, model, vectors, ids)
                if baseline is not None:
                    calls["toolbox-baseline"], calls["one-set-baseline"] = toolbox_steering(baseline, other, vectors, ids)
                calls["hook"] = hook_steering(raw, vectors, ids)
                reference = "hook"
            results = {name: fn().float() for name, fn in calls.items()}
            with torch.no_grad():
                base = raw(ids).logits.float()
            effect = float((results[reference] - base).abs().max())
            if not effect > 1e-3:
                raise SystemExit(f"{kind} K={k}: `{reference}` changes the logits by only {effect:.3g}: the agreement check would show nothing; nothing was timed.")
            worst = check_agreement(kind, k, results, reference)
            if kind == "lora":
                check_agreement(kind, k, {n: v for n, v in results.items() if n != "peft-mixed"}, "hook")
            print(f"{kind} K={k}: every row agrees with `{reference}` (max |diff| {max(worst.values(), default=0):.2g}; the interventions change the logits by up to {effect:.2g})", flush=True)
            timings = time_interleaved({name: (fn, _nothing) for name, fn in calls.items()}, repeats=args.repeats, warmup=args.warmup, device="cpu", clock="cpu")
            for name, timing in timings.items():
                record = dict(measure="forward", kind=kind, k=k, variant=name, median_ms=timing.median * 1e3, times_ms=[round(t * 1e3, 3) for t in timing.times], spread=round(timing.spread, 4))
                for other_name in ("one-set", "peft-mixed", "hook"):
                    if other_name in timings and other_name != name:
                        record[f"over_{other_name}"] = round(paired_ratio(timing.times, timings[other_name].times), 4)
                if name == "toolbox" and "toolbox-baseline" in timings:
                    record["over_baseline"] = round(paired_ratio(timing.times, timings["toolbox-baseline"].times), 4)
                records.append(record)
            line = ", ".join(f"{n} {t.median * 1e3:.1f} ms" for n, t in timings.items())
            print(f"  {line}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args.out.with_suffix(".md").write_text(markdown(records))
    if not args.no_plot:
        plot(records, args.out.with_suffix(".png"))
    print(markdown(records))


import contextlib  # noqa: E402

_nothing = contextlib.nullcontext


def markdown(records: list[dict]) -> str:
    meta = records[0]
    lines = [
        "# Many interventions in one batch (CPU)",
        "",
        f"{meta['date']}, {meta['device']}, one thread, process CPU time, median of the rounds; "
        f"one forward of K rows x {meta['tokens']} tokens, GPT-2 64 wide, 16 layers, vocabulary 4096, random weights. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        "",
        "- **toolbox**: K invokes, row k its own intervention; **one set**: one intervention on the same K rows, one invoke;",
        "- **PEFT mixed**: `PeftModel` with K adapters, `adapter_names=` one per row (LoRA only);",
        "- **hook**: a plain torch forward hook doing the gathered computation (`bmm` per row for LoRA, an indexed add for steering).",
        "",
        "Ratios are medians over rounds of the round's ratio. Every row's logits were checked against PEFT and the hook (`torch.allclose`) before timing.",
        "",
    ]
    if meta.get("baseline"):
        lines += [f"**over baseline toolbox**: over the package loaded from `{meta['baseline']}` (before this change), timed in the same rounds on its own copy of the model.", ""]
    lines += ["The (±x%) after a time is half the spread of its rounds over their median: read ratios that differ by less as ties.", ""]
    for kind, title in (("lora", "LoRA: r=16 on every `c_attn` (16 adapters per row)"), ("steering", "Steering: one vector per row on every block's output (16 per row)")):
        rows = [r for r in records if r.get("measure") == "forward" and r["kind"] == kind]
        if not rows:
            continue
        baseline = any(r["variant"] == "toolbox-baseline" for r in rows)
        lines += [f"## {title}", ""]
        head = "| K | toolbox ms | over one set | over PEFT mixed | over hook |" + (" over baseline toolbox |" if baseline else "") + " one set ms | PEFT mixed ms | hook ms |"
        lines += [head, "|" + " --- |" * (head.count("|") - 1)]
        for k in sorted({r["k"] for r in rows}):
            by = {r["variant"]: r for r in rows if r["k"] == k}
            t = by["toolbox"]

            def cell(key):
                return f"{t[key]:.2f}x" if key in t else "-"

            def ms(name):
                return f"{by[name]['median_ms']:.1f}" if name in by else "-"

            lines.append(
                f"| {k} | {t['median_ms']:.1f} (±{t['spread'] * 50:.0f}%) | {cell('over_one-set')} | {cell('over_peft-mixed')} | {cell('over_hook')} |"
                + (f" {cell('over_baseline')} |" if baseline else "")
                + f" {ms('one-set')} | {ms('peft-mixed')} | {ms('hook')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [kind for kind in ("lora", "steering") if any(r.get("kind") == kind for r in records)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    labels = {"toolbox": "toolbox (K invokes)", "toolbox-baseline": "toolbox before (K invokes)", "one-set": "one set on K rows", "peft-mixed": "PEFT mixed batch", "hook": "gathered hook"}
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in records if r.get("kind") == kind]
        for variant in labels:
            points = sorted((r["k"], r["median_ms"]) for r in rows if r["variant"] == variant)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=labels[variant])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K interventions (one per row)")
        ax.set_ylabel("ms per forward (CPU time, one thread)")
        ax.set_title("LoRA sets, r=16 on 16 c_attn" if kind == "lora" else "steering vectors on 16 blocks")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
