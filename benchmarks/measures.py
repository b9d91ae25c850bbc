"""The measures of a benchmark run, each returning plain records for the report.

Every record is a dict with at least ``measure`` and ``variant``; timed ones
carry ``median_ms``, ``times_ms`` and ``spread`` (``(max - min) / median``).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from timing import Timing, current_memory, peak_memory, prepare_cpu_memory_tracking, synchronize, time_interleaved
from variants import AdapterInit, HooksVariant, Models, PeftVariant, ToolboxVariant, Variant, adapter_init, build_models

__all__ = ["agreement", "main_measures", "train_peak_memory", "token_scaling", "many_adapters", "steady_loop"]


def timed_records(measure: str, timings: dict[str, Timing], **extra: Any) -> list[dict]:
    return [
        dict(
            measure=measure,
            variant=name,
            median_ms=t.median * 1e3,
            min_ms=min(t.times) * 1e3,
            times_ms=[round(x * 1e3, 3) for x in t.times],
            wall_ms=[round(x * 1e3, 3) for x in t.wall],
            spread=round(t.spread, 4),
            **extra,
        )
        for name, t in timings.items()
    ]


def _run(label: str, calls: dict, *, repeats: int, warmup: int, config: Any) -> dict[str, Timing]:
    with tqdm(total=warmup + repeats, desc=label, leave=False) as bar:
        return time_interleaved(calls, repeats=repeats, warmup=warmup, device=config.device, clock=config.clock, progress=lambda _: bar.update())


def agreement(variants: dict[str, Variant], ids: torch.Tensor, prompt: torch.Tensor, n: int) -> list[dict]:
    """Each variant's logits and greedy tokens against ``hooks`` (the plain-torch reference).

    A variant that computes something else would be timed for nothing: this
    runs before any training step changes the weights.
    """
    if "hooks" not in variants or "base" not in variants:
        return []
    reference = variants["hooks"]
    with reference.active():
        logits = reference.forward(ids).float()
        tokens = reference.generate(prompt, n)
    base = variants["base"].forward(ids).float()
    records = []
    for name, variant in variants.items():
        with variant.active():
            theirs = variant.forward(ids).float()
            their_tokens = variant.generate(prompt, n)
        adapted = name not in ("base", "nnsight-base")
        records.append(
            dict(
                measure="agreement",
                variant=name,
                max_abs_logit_diff=float((theirs - (logits if adapted else base)).abs().max()),
                adapter_effect=float((logits - base).abs().max()),
                same_tokens=bool(torch.equal(their_tokens, tokens)) if adapted else None,
            )
        )
    return records


def main_measures(config: Any, variants: dict[str, Variant], ids: torch.Tensor, prompt: torch.Tensor) -> list[dict]:
    """Training step, inference forward and generation for every variant."""
    records = []
    trainers = {name: v for name, v in variants.items() if v.trains}
    calls = {name: (lambda v=v: v.train_step(ids), v.active) for name, v in trainers.items()}
    timings = _run("train step", calls, repeats=config.repeats, warmup=config.warmup, config=config)
    records += timed_records("train_step", timings, batch=list(ids.shape))

    calls = {name: (lambda v=v: v.forward(ids), v.active) for name, v in variants.items()}
    timings = _run("forward", calls, repeats=config.forward_repeats or config.repeats, warmup=config.warmup, config=config)
    records += timed_records("forward", timings, batch=list(ids.shape))

    n = config.new_tokens
    calls = {name: (lambda v=v: v.generate(prompt, n), v.active) for name, v in variants.items()}
    timings = _run(f"generate {n}", calls, repeats=config.repeats, warmup=config.warmup, config=config)
    records += timed_records("generate", timings, new_tokens=n, prompt=list(prompt.shape))
    return records


def train_peak_memory(config: Any, variants: dict[str, Variant], ids: torch.Tensor) -> list[dict]:
    """Peak memory of one training step per variant, above what was in use before it.

    Run last: on CPU it fixes glibc's mmap threshold (see
    `timing.prepare_cpu_memory_tracking`), which would slow every later
    allocation down. AdamW's state already exists from the timed steps.
    """
    if config.device == "cpu":
        prepare_cpu_memory_tracking()
    records = []
    for name, variant in variants.items():
        if variant.trains:
            with variant.active():
                peak = peak_memory(lambda: variant.train_step(ids), config.device)
            records.append(dict(measure="train_peak_memory", variant=name, bytes=peak))
    return records


def token_scaling(config: Any, variants: dict[str, Variant], prompt: torch.Tensor) -> list[dict]:
    """ms per generated token at several lengths: the adapter's cost must not grow with length."""
    chosen = {name: variants[name] for name in config.token_variants if name in variants}
    calls = {
        f"{name}@{n}": (lambda v=v, n=n: v.generate(prompt, n), v.active)
        for n in config.token_lengths
        for name, v in chosen.items()
    }
    timings = _run("tokens", calls, repeats=config.token_repeats, warmup=0, config=config)  # already warm
    records = []
    for key, timing in timings.items():
        name, n = key.split("@")
        records.append(
            dict(
                measure="ms_per_token",
                variant=name,
                new_tokens=int(n),
                median_ms=timing.median * 1e3,
                ms_per_token=timing.median * 1e3 / int(n),
                times_ms=[round(x * 1e3, 3) for x in timing.times],
                wall_ms=[round(x * 1e3, 3) for x in timing.wall],
            )
        )
    return records


def many_adapters(config: Any, models: Models, prompt: torch.Tensor) -> list[dict]:
    """Generation with 2 adapters against many (64 where the model has that many targets)."""
    note = "the benchmark model"
    if config.many_model is not None:
        models = build_models(dataclasses.replace(config, model=config.many_model))
        note = ", ".join(f"{k}={v}" for k, v in config.many_model.items())
    model = models.nnsight
    full = adapter_init(model, config.many_targets, config.r, config.seed + 1, config.many_layers)
    paths = full.paths[:64]
    counts = {2: AdapterInit({p: full.weights[p] for p in paths[:2]}), len(paths): AdapterInit({p: full.weights[p] for p in paths})}
    n = config.new_tokens
    records = []
    for count, init in counts.items():
        variants: dict[str, Variant] = {
            "toolbox": ToolboxVariant(model, init, config.r, models.pad_token_id),
            "peft": PeftVariant(models.raw, init, config.r, models.pad_token_id),
            "hooks": HooksVariant(models.raw, init, models.pad_token_id),
        }
        calls = {name: (lambda v=v: v.generate(prompt, n), v.active) for name, v in variants.items()}
        timings = _run(f"{count} adapters", calls, repeats=config.many_repeats, warmup=1, config=config)
        records += timed_records("generate_many", timings, adapters=count, new_tokens=n, model=note)
        del variants, calls
        gc.collect()
    return records


def steady_loop(config: Any, variant: ToolboxVariant, vocab: int, model_note: str) -> list[dict]:
    """A long training loop of ``variant``: step time and memory must not grow.

    Memory is sampled every step (CUDA allocated, or resident size on CPU) and
    live Python objects at a few checkpoints.
    """
    generator = torch.Generator().manual_seed(config.seed + 2)
    batch, tokens = config.loop_batch
    ids = torch.randint(0, vocab, (batch, tokens), generator=generator).to(config.device)
    steps = config.loop_steps
    checkpoints = {steps // 10, steps // 2, steps - 1}
    clock = time.process_time if config.clock == "cpu" else time.perf_counter
    times, memory, objects = [], [], {}
    for step in tqdm(range(steps), desc="training loop", leave=False):
        synchronize(config.device)
        start = clock()
        variant.train_step(ids)
        synchronize(config.device)
        times.append(clock() - start)
        memory.append(current_memory(config.device))
        if step in checkpoints:
            gc.collect()
            objects[step] = len(gc.get_objects())
    settle = steps // 10  # the first steps warm caches up
    window = max(1, steps // 10)
    early, late = times[settle : settle + window], times[-window:]
    return [
        dict(
            measure="steady_loop",
            variant=variant.name,
            model=model_note,
            steps=steps,
            batch=[batch, tokens],
            early_step_ms=statistics.median(early) * 1e3,
            late_step_ms=statistics.median(late) * 1e3,
            memory_start_bytes=memory[settle],
            memory_end_bytes=memory[-1],
            memory_max_bytes=max(memory[settle:]),
            live_objects={str(k): v for k, v in sorted(objects.items())},
        )
    ]
