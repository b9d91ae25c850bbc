"""Where the time of K LoRA sets in K invokes goes, measured by taking the work away a part at a time.

Run by hand, never as a test::

    python benchmarks/batched_breakdown.py             # K = 64, 25 rounds: about 2 minutes on one core
    python benchmarks/batched_breakdown.py --k 16

`batched.py` times the package's K-invokes form against one set, PEFT's mixed
batch and a gathered hook. This script says what the package's share of that
time is made of, on the same model and batch (``batched.py``'s LoRA case: r=16
on the 16 ``c_attn`` of ``configs.py``'s ``cpu-dispatch-gpt2`` model, K rows x 16
tokens). Each variant is one forward:

- **bare**: K invokes that switch nothing on (on their own copy of the model: a
  trace with no intervention on the adapted model would retire its controllers,
  and the next run would pay to stack the sets again);
- **switch-on**: K invokes each calling ``sets[k]()``, with the per-pass work
  (`activation.add_deltas`) replaced by a stub that marks every live member as
  having acted and returns the output unchanged. What is left is each member's
  switch-on, nnsight's handoff and the controller's search for live activations;
- **+ plan**: the stub also groups the live activations (`activation._planned`), as
  every pass does;
- **+ check**: the stub also takes each group's stack (`grouped.Group.stack`),
  which reads every stacked parameter's identity, ``_version`` and storage to see
  an optimizer step or an in-place edit;
- **+ the rest but the arithmetic**: the package as it is, with `LORA`'s grouped
  computation (`_grouped_intervene`: two batched matmuls) returning the output unchanged;
- **full**: the package as it is;
- **one set**, **PEFT mixed**: as in ``batched.py``.

The four stubbed variants compute the base model's logits, not the adapted
ones: they are timed, never used. ``full`` is checked against PEFT's mixed
batch (``torch.allclose``) before anything is timed.

Timing: process CPU time, one torch thread, rounds interleaved with the order
reversed every other round, a garbage collection before each call; ratios are
medians over rounds of the round's ratio to ``bare``. The last line states
what PEFT's mixed batch leaves: at most 0.6x its time is how many times bare's.

Writes ``benchmarks/reports/batched-breakdown-cpu.md`` and ``.jsonl`` (``--out``
to change the stem).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batched import TOKENS, peft_mixed, toolbox_lora  # noqa: E402
from configs import CONFIGS  # noqa: E402
from run import device_name, versions  # noqa: E402
from variants import adapter_init, build_models  # noqa: E402

REPORTS = Path(__file__).resolve().parent / "reports"
R = 16
NO_ARITHMETIC = "+ the rest but the arithmetic"
STEPS = ("switch-on", "+ plan", "+ check", NO_ARITHMETIC, "full")  # each does the work of the one before, and more


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=64, help="how many LoRA sets, one per row and invoke")
    parser.add_argument("--repeats", type=int, default=25, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPORTS / "batched-breakdown-cpu", help="stem of the .jsonl/.md")
    return parser.parse_args(argv)


def stubs(activation, grouped) -> dict:
    """Stand-ins for `activation.add_deltas` that do part of its work: each marks the live members as having acted."""

    def switch_on_only(output, x, live, interleaver, controller):
        for member in live:
            member.acted = True
        return output

    def plan_only(output, x, live, interleaver, controller):
        activation._planned(live, controller)
        return switch_on_only(output, x, live, interleaver, controller)

    def plan_and_check(output, x, live, interleaver, controller):
        for step in activation._planned(live, controller):
            if type(step) is grouped.Group:
                step.stack(controller)
        return switch_on_only(output, x, live, interleaver, controller)

    return {"switch-on": switch_on_only, "+ plan": plan_only, "+ check": plan_and_check}


def bare_invokes(model, ids: torch.Tensor):
    """K invokes of one row each that switch nothing on, and a whole-batch invoke that saves the logits."""
    rows = [ids[k : k + 1] for k in range(ids.shape[0])]

    def forward():
        with torch.no_grad(), model.trace() as tracer:
            for k in range(len(rows)):
                with tracer.invoke(rows[k]):
                    pass
            with tracer.invoke():
                logits = model.lm_head.output.save()
        return logits

    return forward


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import nnsight_toolbox
    from nnsight import LanguageModel
    from nnsight_toolbox.optim import activation, grouped

    config = CONFIGS["cpu-dispatch-gpt2"]
    models = build_models(config)
    raw, model = models.raw, models.nnsight
    vocab = config.model["vocab_size"]
    ids = torch.randint(0, vocab, (args.k, TOKENS), generator=torch.Generator().manual_seed(0))
    weights = [adapter_init(model, ["c_attn"], R, seed=seed).weights for seed in range(args.k)]
    grouped_call, one_set = toolbox_lora(nnsight_toolbox, model, weights, ids)
    peft = peft_mixed(raw, weights, ids)
    bare = bare_invokes(LanguageModel(copy.deepcopy(raw), tokenizer=model.tokenizer), ids)

    real = activation.add_deltas
    per_pass = {"full": real, NO_ARITHMETIC: real, **stubs(activation, grouped)}
    computation = nnsight_toolbox.LORA._grouped_intervene

    def unchanged(self, output, *rest):
        return output

    def with_pass(name):
        def call():
            activation.add_deltas = per_pass[name]
            if name == NO_ARITHMETIC:
                nnsight_toolbox.LORA._grouped_intervene = unchanged
            try:
                return grouped_call()
            finally:
                activation.add_deltas = real
                nnsight_toolbox.LORA._grouped_intervene = computation

        return call

    calls = {"bare": bare, **{name: with_pass(name) for name in STEPS}, "one set": one_set, "PEFT mixed": peft}
    full, reference = calls["full"]().float(), peft().float()
    if not torch.allclose(full, reference, atol=1e-4, rtol=1e-4):
        raise SystemExit(f"K={args.k}: the package disagrees with PEFT's mixed batch (max |diff| {(full - reference).abs().max():.3g}); nothing was timed.")
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(args.repeats):
        order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
        for name in order:
            gc.collect()
            start = time.process_time()
            calls[name]()
            times[name].append(time.process_time() - start)
        print(f"round {round_ + 1}/{args.repeats}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    over_bare = {name: statistics.median(t / b for t, b in zip(times[name], times["bare"])) for name in calls}
    meta = dict(measure="meta", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device_name("cpu"), threads=1, clock="cpu", k=args.k, tokens=TOKENS, r=R, versions=versions())
    records = [meta] + [dict(measure="forward", variant=name, median_ms=statistics.median(t) * 1e3, times_ms=[round(x * 1e3, 3) for x in t], over_bare=round(over_bare[name], 4)) for name, t in times.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = markdown(records)
    args.out.with_suffix(".md").write_text(text)
    print(text)


def markdown(records: list[dict]) -> str:
    meta, rows = records[0], {r["variant"]: r for r in records[1:]}
    budget = 0.6 * rows["PEFT mixed"]["over_bare"]
    lines = [
        f"# Where the time of {meta['k']} LoRA sets in {meta['k']} invokes goes (CPU)",
        "",
        f"{meta['date']}, {meta['device']}, one thread, process CPU time; one forward of {meta['k']} rows x {meta['tokens']} tokens, "
        f"GPT-2 64 wide, 16 layers, r={meta['r']} on all 16 `c_attn`, one set per row. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. Method: `benchmarks/batched_breakdown.py`'s docstring.",
        "",
        "| variant | ms | over bare | over the line above |",
        "| --- | --- | --- | --- |",
    ]
    previous = None
    for name, row in rows.items():
        step = f"{(row['over_bare'] - previous) * 100:+.1f}% of bare" if previous is not None and name in STEPS else ""
        lines.append(f"| {name} | {row['median_ms']:.1f} | {row['over_bare']:.3f}x | {step} |")
        previous = row["over_bare"]
    lines += [
        "",
        f"At most 0.6x PEFT's mixed batch is at most {budget:.3f}x bare here; the package takes {rows['full']['over_bare']:.3f}x "
        f"({rows['full']['over_bare'] / rows['PEFT mixed']['over_bare']:.3f}x PEFT's mixed batch), and one set on the same rows "
        f"{rows['one set']['over_bare']:.3f}x.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
