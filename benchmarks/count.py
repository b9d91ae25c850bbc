"""Count the instructions each variant executes, with callgrind: per-call cost without the noise.

On a shared CPU one timed call varies by ±10-17%, which hides a difference of
a few percent between this package and PEFT. An instruction count does not
move with the machine's load: counts of the same call differ by a few tenths of
a percent at most (the allocator's and the interpreter's state). It is not a time
(cache misses and memory stalls are not in it), so it answers one question
well: what each variant adds in Python and dispatch work per module call. That
is the whole cost where the arithmetic is small (narrow models, batch-1
generation), and it is what bounds batch-1 generation on a GPU, where the CPU
launching kernels sets the pace. Run by hand, never as a test::

    python benchmarks/count.py --config cpu-dispatch            # about 10 minutes on 2 cores
    python benchmarks/count.py --config tiny --variants toolbox base

Each variant runs in its own process under ``valgrind --tool=callgrind``
(needs ``apt-get install valgrind``). The process builds the model
uninstrumented, switches instrumentation on, warms each measure up once, then
runs it once more inside ``sys.call_tracing``: callgrind counts only inside
that call (``--toggle-collect``) and writes one dump per measure. Generation
is also run twice in one count, which must come to twice the single count:
the check that the counting caught the whole call (nnsight runs interventions
on greenlets, which switch stacks).

Writes ``benchmarks/results/count-<config>-<time>.jsonl`` and a ``.md`` table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: Variants counted by default: the package, its references, and the two bases
#: that per-adapter costs are taken against.
DEFAULT_VARIANTS = ("toolbox", "peft-in-nnsight", "peft", "hooks", "nnsight-base", "base")
#: Where each variant's per-adapter cost is measured from: the same model without adapters.
BASE_OF = {"toolbox": "nnsight-base", "nnsight": "nnsight-base", "peft-in-nnsight": "nnsight-base", "peft": "base", "hooks": "base"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from configs import CONFIGS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-dispatch")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens each counted generate produces (default 8)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="variants counted at once (default: one per core)")
    parser.add_argument("--out", type=Path, help="JSON lines file (default: benchmarks/results/count-<config>-<time>.jsonl)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the variant this process counts, under callgrind
    parser.add_argument("--dumps", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# The counted process
# ---------------------------------------------------------------------------


def callgrind_control(*args: str) -> None:
    """Send a command to the callgrind this process runs under, and wait for it to be done.

    Callgrind reads commands only while the process runs code, so the wait spins
    in Python rather than sleeping; nothing is counted outside `sys.call_tracing`.
    """
    control = subprocess.Popen(["callgrind_control", *args, str(os.getpid())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while control.poll() is None:
        sum(range(1000))
    output = control.stdout.read()
    if control.returncode != 0 or (args[0].startswith("--dump") and "OK" not in output):
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {output.strip()}")


def count_in_worker(args: argparse.Namespace) -> None:
    import gc

    import torch

    from configs import build_config
    from variants import adapter_init, build_models, build_variants

    config = build_config(args.config, threads=1)
    if config.device != "cpu":
        raise SystemExit(f"--config {config.name} runs on {config.device}; counting runs on the CPU. Try --config cpu-dispatch.")
    torch.set_num_threads(1)
    models = build_models(config)
    init = adapter_init(models.nnsight, config.targets, config.r, config.seed)
    variant = build_variants(models, init, config.r, (args.worker,))[args.worker]
    args.dumps.with_suffix(".json").write_text(json.dumps(dict(adapters=len(init.paths))))
    generator = torch.Generator().manual_seed(config.seed)
    vocab = models.raw.config.vocab_size
    ids = torch.randint(0, vocab, config.train_batch, generator=generator)
    prompt = torch.randint(0, vocab, (1, config.prompt_tokens), generator=generator)
    n = args.new_tokens
    calls = {
        "train_step": (lambda: variant.train_step(ids)) if variant.trains else None,
        "forward": lambda: variant.forward(ids),
        "generate": lambda: variant.generate(prompt, n),
        "generate_x2": lambda: (variant.generate(prompt, n), variant.generate(prompt, n)),  # the counting check
    }
    with variant.active():
        for call in calls.values():  # uninstrumented warm-up: caches, lazy imports
            if call is not None:
                call()
        gc.collect()
        gc.freeze()
        gc.disable()  # a collection would land in whichever count it fell in
        callgrind_control("-i", "on")
        for measure, call in calls.items():
            if call is None:
                continue
            call()  # once instrumented, so that translating the code is not counted
            sys.call_tracing(call, ())
            callgrind_control(f"--dump={measure}")


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


def read_dumps(prefix: Path) -> dict[str, int]:
    """``{measure: instructions}`` from the dump files callgrind wrote (``prefix.1``, ``prefix.2``, ...)."""
    counts = {}
    for path in sorted(prefix.parent.glob(prefix.name + ".*"), key=lambda p: int(p.suffix[1:])):
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: dump (\S+)", text, re.M)
        total = re.search(r"^totals: (\d+)", text, re.M)
        if trigger and total:
            counts[trigger.group(1)] = int(total.group(1))
    return counts


def run_under_callgrind(prefix: Path, script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``script args`` under callgrind, counting only inside `sys.call_tracing`, dumps at ``prefix.N``."""
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
        "--toggle-collect=sys_call_tracing", f"--callgrind-out-file={prefix}",
        sys.executable, str(script), *args,
    ]
    env = dict(os.environ, PYTHONHASHSEED="0", TQDM_DISABLE="1")
    return subprocess.run(command, capture_output=True, text=True, env=env)


def count_variant(config: str, variant: str, new_tokens: int, work: Path) -> tuple[str, dict[str, int], str]:
    """Run one variant's counted process; its counts (and ``adapters``, the adapter count), and its output should it fail."""
    prefix = work / f"{variant}.callgrind"
    done = run_under_callgrind(
        prefix, Path(__file__).resolve(), "--config", config, "--worker", variant, "--new-tokens", str(new_tokens), "--dumps", str(prefix)
    )
    counts = read_dumps(prefix)
    if prefix.with_suffix(".json").exists():
        counts["adapters"] = json.loads(prefix.with_suffix(".json").read_text())["adapters"]
    return variant, counts, "" if done.returncode == 0 and counts else (done.stdout + done.stderr)[-4000:]


def records_of(counts: dict[str, dict[str, int]], new_tokens: int, adapters: int) -> list[dict]:
    """One record per variant and measure: instructions, ratio to PEFT, and cost per adapter call."""
    records = []
    for variant, by_measure in counts.items():
        for measure in ("train_step", "forward", "generate"):
            if measure not in by_measure:
                continue
            record = dict(measure="instructions", op=measure, variant=variant, instructions=by_measure[measure])
            for reference in ("peft", "peft-in-nnsight"):
                theirs = counts.get(reference, {}).get(measure)
                if theirs:
                    record[f"ratio_to_{reference.replace('-', '_')}"] = round(by_measure[measure] / theirs, 4)
            base = counts.get(BASE_OF.get(variant, ""), {}).get(measure)
            if base is not None and measure == "generate":
                # a generate of n new tokens is n forward passes, each calling every adapter once
                record["per_adapter_call"] = round((by_measure[measure] - base) / (new_tokens * adapters))
            records.append(record)
        if "generate" in by_measure and "generate_x2" in by_measure:
            records.append(dict(measure="linearity", variant=variant, x2_over_x1=round(by_measure["generate_x2"] / by_measure["generate"], 5)))
    return records


def markdown(meta: dict, records: list[dict]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in records if r["measure"] == "instructions"))
    cell = {(r["op"], r["variant"]): r for r in records if r["measure"] == "instructions"}
    lines = [
        f"### Instructions, `{meta['config']}` ({meta['adapters']} adapters, r={meta['r']}; generate: {meta['new_tokens']} new tokens at batch 1)",
        "",
        "| measure | PEFT (M instructions) | " + " | ".join(variants) + " |",
        "| --- | --- | " + " | ".join("---" for _ in variants) + " |",
    ]
    for op in ("train_step", "forward", "generate"):
        if (op, "peft") not in cell:
            continue
        row = [f"{cell[(op, v)]['ratio_to_peft']:.3f}x" if (op, v) in cell and "ratio_to_peft" in cell[(op, v)] else "-" for v in variants]
        lines.append(f"| {op.replace('_', ' ')} | {cell[(op, 'peft')]['instructions'] / 1e6:,.1f} | " + " | ".join(row) + " |")
    against = [
        f"{op.replace('_', ' ')} {cell[(op, 'toolbox')]['ratio_to_peft_in_nnsight']:.3f}x"
        for op in ("train_step", "forward", "generate")
        if "ratio_to_peft_in_nnsight" in cell.get((op, "toolbox"), {})
    ]
    if against:
        lines += ["", "Toolbox over PEFT inside nnsight (`peft=`): " + ", ".join(against) + "."]
    per_call = {v: cell[("generate", v)].get("per_adapter_call") for v in variants if ("generate", v) in cell}
    per_call = {v: c for v, c in per_call.items() if c is not None}
    if per_call:
        lines += ["", "Per adapter call in generation (over the same model without adapters): " + ", ".join(f"{v} {c / 1e3:,.1f}k" for v, c in per_call.items()) + " instructions."]
    linear = [r for r in records if r["measure"] == "linearity"]
    if linear:
        lines += ["", "Counting check, two generates in one count over one: " + ", ".join(f"{r['variant']} {r['x2_over_x1']:.4f}" for r in linear) + " (2 means the whole call was counted)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    if args.worker:
        count_in_worker(args)
        return None
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not found: counting needs valgrind (`apt-get install valgrind`).")
    from configs import build_config
    from report import write_jsonl, write_results
    from tqdm.auto import tqdm

    config = build_config(args.config)
    if config.device != "cpu":
        raise SystemExit(f"--config {config.name} runs on {config.device}; counting runs on the CPU. Try --config cpu-dispatch.")
    if "peft" not in args.variants:
        raise SystemExit("Ratios are taken to PEFT: keep `peft` among --variants.")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / f"count-{config.name}-{stamp}.jsonl"
    counts: dict[str, dict[str, int]] = {}
    adapters = 0

    def finished() -> list[dict]:
        """The meta line and the records of the variants counted so far, in the order asked for."""
        meta = dict(measure="meta", kind="instructions", config=config.name, model_config=config.model, targets=list(config.targets), adapters=adapters, r=config.r, new_tokens=args.new_tokens, train_batch=list(config.train_batch), date=stamp)
        if len(counts) < len(args.variants):
            meta["partial"] = True
        return [meta, *records_of({v: counts[v] for v in args.variants if v in counts}, args.new_tokens, adapters)]

    with tempfile.TemporaryDirectory() as work, concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(count_variant, config.name, v, args.new_tokens, Path(work)) for v in args.variants]
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="variants under callgrind"):
            variant, by_measure, failure = future.result()
            if failure:
                raise SystemExit(f"Counting `{variant}` failed:\n{failure}")
            adapters = max(adapters, by_measure.pop("adapters", 0))
            counts[variant] = by_measure
            # A count of a large config takes many minutes a variant: one cut short keeps what it finished.
            write_jsonl(out, finished())
    records = finished()
    meta = records[0]
    write_results(out, records, markdown(meta, records))
    return out


if __name__ == "__main__":
    main()
