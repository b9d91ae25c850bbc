"""Time this package's LoRA against PEFT, plain hooks and the base model, in one process.

Run by hand, never as a test::

    python benchmarks/run.py --config tiny                 # smoke check, seconds
    python benchmarks/run.py --config cpu                  # the CPU bar, ~10 minutes
    python benchmarks/run.py --config gpu-1b               # the GPU bar (needs CUDA)

Writes JSON lines (one record per variant and measure, plus the environment
and the bar) and a markdown table beside them. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from configs import CONFIGS, BenchConfig, build_config  # noqa: E402
from measures import agreement, main_measures, many_adapters, steady_loop, token_scaling, train_peak_memory  # noqa: E402
from report import add_ratios, bar_checks, markdown, write_jsonl, write_results  # noqa: E402
from variants import ToolboxVariant, adapter_init, build_models, build_variants  # noqa: E402

ALL_EXTRAS = ("tokens", "many", "loop")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--out", type=Path, help="JSON lines file (default: benchmarks/results/<config>-<time>.jsonl); the .md goes beside it")
    parser.add_argument("--repeats", type=int, help="timed repeats per measure (default: the config's)")
    parser.add_argument("--loop-steps", type=int, help="steps of the steady-state loop (default: the config's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=ALL_EXTRAS, help="leave out extra measures")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the config's, else torch's); 1 is steadier on a shared machine")
    parser.add_argument("--variants", nargs="+", help="variants to time (default: the config's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), help="what to time (default: the config's): wall time, or process CPU time (CPU only)")
    return parser.parse_args(argv)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU ({model})"


def versions() -> dict[str, str]:
    import nnsight
    import peft
    import transformers

    import nnsight_toolbox

    return dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        nnsight=nnsight.__version__,
        peft=peft.__version__,
        nnsight_toolbox=nnsight_toolbox.__version__,
        python=platform.python_version(),
    )


@contextlib.contextmanager
def phase(label: str) -> Iterator[None]:
    """Print how long a part of the run took, so a slow part shows."""
    start = time.perf_counter()
    yield
    print(f"  {label}: {time.perf_counter() - start:.0f} s", flush=True)


def loop_variant(config: BenchConfig, variants: dict) -> tuple[ToolboxVariant, str]:
    """The toolbox variant the steady-state loop trains: the benchmark's own, or
    one on the config's narrower ``loop_model``."""
    if config.loop_model is None:
        return variants["toolbox"], "the benchmark model"
    narrow = dataclasses.replace(config, model=config.loop_model)
    models = build_models(narrow)
    init = adapter_init(models.nnsight, config.targets, config.r, config.seed)
    note = ", ".join(f"{k}={v}" for k, v in config.loop_model.items())
    return ToolboxVariant(models.nnsight, init, config.r, models.pad_token_id), note


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    config = build_config(args.config, repeats=args.repeats, loop_steps=args.loop_steps, threads=args.threads, clock=args.clock, variants=tuple(args.variants) if args.variants else None)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--config {config.name} needs a CUDA GPU; none is available here. Try --config cpu.")
    if config.threads:
        torch.set_num_threads(config.threads)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).resolve().parent / "results" / f"{config.name}-{stamp}.jsonl"
    started = time.perf_counter()

    models = build_models(config)
    hf_config = models.raw.config
    init = adapter_init(models.nnsight, config.targets, config.r, config.seed)
    variants = build_variants(models, init, config.r, config.variants)
    generator = torch.Generator().manual_seed(config.seed)
    vocab = hf_config.vocab_size
    ids = torch.randint(0, vocab, config.train_batch, generator=generator).to(config.device)
    prompt = torch.randint(0, vocab, (1, config.prompt_tokens), generator=generator).to(config.device)

    meta = dict(
        measure="meta",
        config=config.name,
        device_name=device_name(config.device),
        dtype=str(config.dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
        clock=config.clock,
        model_config={k: v for k, v in hf_config.to_diff_dict().items() if not k.startswith("_")},
        parameters=sum(p.numel() for p in models.raw.parameters()),
        targets=list(config.targets),
        adapters=len(init.paths),
        r=config.r,
        repeats=config.repeats,
        forward_repeats=config.forward_repeats or config.repeats,
        warmup=config.warmup,
        new_tokens=config.new_tokens,
        versions=versions(),
        date=stamp,
    )
    print(f"{config.name}: {meta['device_name']}, {meta['parameters']:,} parameters, {len(init.paths)} adapters; variants: {', '.join(variants)}")

    # Everything built so far lives to the end: freezing it keeps the collection
    # before every timed call (see `timing`) from re-scanning the whole heap.
    gc.collect()
    gc.freeze()
    records: list[dict] = []

    def checkpoint() -> None:
        """Write what is measured so far: a run cut short (a device lease ending) keeps it."""
        write_jsonl(out, [dict(meta, partial=True), *records])

    with phase("agreement"):
        records += agreement(variants, ids[:2], prompt, config.new_tokens)
    with phase("train step, forward, generate"):
        records += main_measures(config, variants, ids, prompt)
    checkpoint()
    if "tokens" not in args.skip:
        with phase("ms per token"):
            records += token_scaling(config, variants, prompt)
        checkpoint()
    if "many" not in args.skip and config.many_targets:
        with phase("many adapters"):
            records += many_adapters(config, models, prompt)
        checkpoint()
    if "loop" not in args.skip:
        with phase("steady loop"):
            looped, note = loop_variant(config, variants)
            records += steady_loop(config, looped, looped.model._module.config.vocab_size, note)
        checkpoint()
    with phase("peak memory"):
        records += train_peak_memory(config, variants, ids)
    add_ratios(records)
    records += bar_checks(config.name, records)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    records.insert(0, meta)

    write_results(out, records, markdown(meta, records), took=f" in {meta['wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    main()
