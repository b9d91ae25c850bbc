"""From records to a verdict: ratios, the performance bar, JSON lines and a markdown table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from variants import VARIANT_ORDER

__all__ = ["add_ratios", "bar_checks", "write_jsonl", "markdown"]

#: The bar, per configuration: (measure, variant, reference, the most the ratio may be).
GPU_BAR = [
    ("train_step", "toolbox", "peft", 1.00),
    ("train_step", "toolbox", "hooks", 1.03),
    ("forward", "toolbox", "peft", 1.00),
    ("forward", "toolbox", "hooks", 1.03),
    ("generate", "toolbox", "peft", 1.00),
    ("generate", "toolbox", "hooks", 1.05),
    ("generate", "toolbox-merged", "base", 1.05),
]
CPU_BAR = [
    ("train_step", "toolbox", "peft", 1.00),
    ("generate", "toolbox", "peft", 1.00),
    # issue 16: against PEFT loaded inside nnsight (`peft=`), the user's real alternative
    ("train_step", "toolbox", "peft-in-nnsight", 1.00),
    ("generate", "toolbox", "peft-in-nnsight", 1.00),
]
# Where per-call cost dominates, the package's cheaper adapter call must show.
DISPATCH_BAR = [
    ("train_step", "toolbox", "peft-in-nnsight", 1.00),
    ("generate", "toolbox", "peft-in-nnsight", 0.90),
]
BARS = {"gpu-1b": GPU_BAR, "gpu-8b": GPU_BAR, "cpu": CPU_BAR, "cpu-dispatch-gpt2": DISPATCH_BAR, "tiny": CPU_BAR}
BAR_CONFIGS = ("cpu", "cpu-dispatch-gpt2", "gpu-1b", "gpu-8b")
#: The references every timed record gets a ``ratio_to_<name>`` for ('-' becomes '_').
REFERENCES = ("peft", "peft-in-nnsight", "hooks", "base")
MEASURES = (("train_step", "train step"), ("forward", "forward"), ("generate", "generate"))
TIMED = ("train_step", "forward", "generate")


def medians(records: list[dict], measure: str) -> dict[str, float]:
    return {r["variant"]: r["median_ms"] for r in records if r["measure"] == measure}


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """The median over rounds of this round's time over the reference's in the same round.

    Both ran back to back in every round, so a slow spell of the machine
    touches both; a ratio of medians taken over different rounds would not cancel it.
    """
    return statistics.median(t / r for t, r in zip(times, reference))


def ratio(records: list[dict], measure: str, variant: str, reference: str) -> float | None:
    found = {r["variant"]: r["times_ms"] for r in records if r["measure"] == measure}
    if variant not in found or reference not in found:
        return None
    return paired_ratio(found[variant], found[reference])


def add_ratios(records: list[dict]) -> None:
    """Give every timed record its ratio to PEFT, PEFT inside nnsight, hooks and base in the same measure."""
    for measure in TIMED:
        for record in records:
            if record["measure"] == measure:
                for reference in REFERENCES:
                    value = ratio(records, measure, record["variant"], reference)
                    if value is not None:
                        record[f"ratio_to_{reference.replace('-', '_')}"] = round(value, 4)


def bar_checks(config_name: str, records: list[dict]) -> list[dict]:
    """Each line of the bar with its measured ratio and whether it holds."""
    checks = []
    for measure, variant, reference, limit in BARS.get(config_name, []):
        value = ratio(records, measure, variant, reference)
        check = f"{measure}: {variant} <= {limit:.2f}x {reference}"
        if value is None:
            checks.append(dict(measure="bar", check=check, holds=None, ratio=None))
            continue
        # Also the ratio of the fastest repeats: noise only ever adds time, so on a
        # shared machine it is the steadier estimate of what each variant costs.
        fastest = {r["variant"]: r["min_ms"] for r in records if r["measure"] == measure}
        checks.append(
            dict(
                measure="bar",
                check=check,
                ratio=round(value, 4),
                min_ratio=round(fastest[variant] / fastest[reference], 4),
                holds=value <= limit,
            )
        )
    checks += memory_check(records) + token_check(records) + loop_check(records)
    return checks


def memory_check(records: list[dict]) -> list[dict]:
    peaks = {r["variant"]: r["bytes"] for r in records if r["measure"] == "train_peak_memory"}
    if peaks.get("toolbox") is None or peaks.get("peft") is None:
        return [dict(measure="bar", check="train peak memory: toolbox <= peft", holds=None, ratio=None)]
    ratio = peaks["toolbox"] / peaks["peft"] if peaks["peft"] else float("inf")
    return [dict(measure="bar", check="train peak memory: toolbox <= peft", ratio=round(ratio, 4), holds=peaks["toolbox"] <= peaks["peft"])]


def token_check(records: list[dict]) -> list[dict]:
    """Flat per-token cost: the toolbox/PEFT ratio at the longest length is no more than 5% above the shortest's."""
    times = {(r["variant"], r["new_tokens"]): r["times_ms"] for r in records if r["measure"] == "ms_per_token"}
    lengths = sorted({n for _, n in times})
    if not lengths or not all(("toolbox", n) in times and ("peft", n) in times for n in lengths):
        return []
    ratios = {n: paired_ratio(times[("toolbox", n)], times[("peft", n)]) for n in lengths}
    first, last = ratios[lengths[0]], ratios[lengths[-1]]
    return [
        dict(
            measure="bar",
            check=f"ms/token flat {lengths[0]}->{lengths[-1]}: toolbox/peft grows <= 5%",
            ratio=round(last / first, 4),
            ratios_to_peft={str(n): round(r, 4) for n, r in ratios.items()},
            holds=last <= first * 1.05,
        )
    ]


def loop_check(records: list[dict]) -> list[dict]:
    """Steady loop: late steps no more than 10% slower than early ones, memory within 1%
    (or 16 MiB, whichever is larger) of its start, and no steady rise in live objects."""
    checks = []
    for r in (r for r in records if r["measure"] == "steady_loop"):
        time_ratio = r["late_step_ms"] / r["early_step_ms"]
        growth = r["memory_end_bytes"] - r["memory_start_bytes"]
        allowed = max(0.01 * r["memory_start_bytes"], 16 * 2**20)
        objects = list(r["live_objects"].values())
        checks.append(dict(measure="bar", check=f"{r['steps']}-step loop: step time steady (late/early <= 1.10)", ratio=round(time_ratio, 4), holds=time_ratio <= 1.10))
        checks.append(dict(measure="bar", check=f"{r['steps']}-step loop: memory steady (growth <= {allowed / 2**20:.0f} MiB)", ratio=None, growth_bytes=growth, holds=growth <= allowed))
        checks.append(dict(measure="bar", check=f"{r['steps']}-step loop: live Python objects do not grow (<= 1% from mid-loop to end)", ratio=None, objects=objects, holds=objects[-1] <= objects[1] * 1.01))
    return checks


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")


def write_results(path: Path, records: list[dict], table: str, took: str = "") -> None:
    """Write ``records`` to ``path`` (JSON lines) and ``table`` beside it (``.md``), and print the table."""
    write_jsonl(path, records)
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {path} and {path.with_suffix('.md')}{took}")


def _fmt_ms(ms: float) -> str:
    return f"{ms:,.1f}" if ms >= 10 else f"{ms:.2f}"


def markdown(meta: dict, records: list[dict]) -> str:
    """The run as markdown: environment, main table, extras and the bar."""
    lines = [f"### `{meta['config']}` on {meta['device_name']}", ""]
    lines.append(
        f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
        f"nnsight {meta['versions']['nnsight']}, peft {meta['versions']['peft']}; {meta['dtype']}, "
        f"{meta['threads']} threads; {meta['parameters']:,} parameters; targets {meta['targets']} "
        f"({meta['adapters']} adapters, r={meta['r']}); median of {meta['repeats']} repeats "
        f"({meta['forward_repeats']} for the forward) after {meta['warmup']} warm-up."
    )
    lines.append("")
    present = [v for v in VARIANT_ORDER if any(r.get("variant") == v and r["measure"] == "generate" for r in records)]
    lines.append("| measure | PEFT ms | " + " | ".join(present) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in present) + " |")
    for measure, label in MEASURES:
        times = medians(records, measure)
        if "peft" not in times:
            continue
        spreads = {r["variant"]: r["spread"] for r in records if r["measure"] == measure}
        cells = []
        for v in present:
            cells.append("-" if v not in times else f"{ratio(records, measure, v, 'peft'):.3f}x (±{spreads[v] * 50:.0f}%)")
        shape = next(r.get("batch") or r.get("prompt") for r in records if r["measure"] == measure)
        suffix = f", {meta['new_tokens']} new" if measure == "generate" else ""
        lines.append(f"| {label} ({'x'.join(map(str, shape))}{suffix}) | {_fmt_ms(times['peft'])} | " + " | ".join(cells) + " |")
    clock = "process CPU time" if meta.get("clock") == "cpu" else "wall time"
    lines += [
        "",
        f"Timed on {clock}. Cells: the median over rounds of the variant's time over PEFT's in the "
        "same round; (±) is half the spread (max - min) of the variant's repeats over their median.",
        "",
    ]
    against = [
        f"{label} {ratio(records, measure, 'toolbox', 'peft-in-nnsight'):.3f}x"
        for measure, label in MEASURES
        if ratio(records, measure, "toolbox", "peft-in-nnsight") is not None
    ]
    if against:
        lines += ["Toolbox over PEFT inside nnsight (`peft=`), paired the same way: " + ", ".join(against) + ".", ""]

    peaks = {r["variant"]: r["bytes"] for r in records if r["measure"] == "train_peak_memory"}
    if peaks:
        lines.append("Peak memory above the start of a training step: " + ", ".join(f"{v} {b / 2**20:,.0f} MiB" if b is not None else f"{v} n/a" for v, b in peaks.items()) + ".")
        lines.append("")
    tokens = [r for r in records if r["measure"] == "ms_per_token"]
    if tokens:
        lengths = sorted({r["new_tokens"] for r in tokens})
        lines.append("| ms per generated token | " + " | ".join(str(n) for n in lengths) + " |")
        lines.append("| --- | " + " | ".join("---" for _ in lengths) + " |")
        for v in dict.fromkeys(r["variant"] for r in tokens):
            per = {r["new_tokens"]: r["ms_per_token"] for r in tokens if r["variant"] == v}
            lines.append(f"| {v} | " + " | ".join(f"{per[n]:.2f}" for n in lengths) + " |")
        lines.append("")
    many = [r for r in records if r["measure"] == "generate_many"]
    if many:
        counts = sorted({r["adapters"] for r in many})
        lines.append(f"Many adapters, on {many[0].get('model', 'the benchmark model')}:")
        lines.append("")
        lines.append(
            f"| generate ({meta['new_tokens']} tokens), ms | " + " | ".join(f"{c} adapters" for c in counts)
            + " | per extra adapter per token | " + " | ".join(f"ratio to PEFT, {c}" for c in counts) + " |"
        )
        lines.append("| --- | " + " | ".join("---" for _ in counts) + " | --- | " + " | ".join("---" for _ in counts) + " |")
        times = {(r["variant"], r["adapters"]): r["times_ms"] for r in many}
        for v in dict.fromkeys(r["variant"] for r in many):
            per = {r["adapters"]: r["median_ms"] for r in many if r["variant"] == v}
            extra = (per[counts[-1]] - per[counts[0]]) / (counts[-1] - counts[0]) / meta["new_tokens"] * 1e3
            ratios = [
                f"{paired_ratio(times[v, c], times['peft', c]):.3f}x" if ("peft", c) in times else "-" for c in counts
            ]
            lines.append(f"| {v} | " + " | ".join(_fmt_ms(per[c]) for c in counts) + f" | {extra:.1f} µs | " + " | ".join(ratios) + " |")
        lines.append("")
    for r in (r for r in records if r["measure"] == "steady_loop"):
        lines.append(
            f"{r['steps']}-step training loop ({r['variant']}, {r['model']}, batch {r['batch'][0]}x{r['batch'][1]}): step "
            f"{r['early_step_ms']:.1f} ms early, {r['late_step_ms']:.1f} ms late; memory "
            f"{r['memory_start_bytes'] / 2**20:,.0f} -> {r['memory_end_bytes'] / 2**20:,.0f} MiB; "
            f"live objects {', '.join(f'{k}: {v:,}' for k, v in r['live_objects'].items())}."
        )
        lines.append("")
    checks = [r for r in records if r["measure"] == "bar"]
    if checks and meta["config"] not in BAR_CONFIGS:
        lines.append(f"Smoke check: the bar is stated for {', '.join(f'`{c}`' for c in BAR_CONFIGS)}; on `{meta['config']}` these lines only show that every check runs.")
        lines.append("")
    if checks:
        lines.append("| bar | measured | fastest repeats | holds |")
        lines.append("| --- | --- | --- | --- |")
        for c in checks:
            measured = f"{c['ratio']:.3f}x" if c.get("ratio") is not None else (f"{c['growth_bytes'] / 2**20:+.1f} MiB" if "growth_bytes" in c else (", ".join(map(str, c["objects"])) if "objects" in c else "-"))
            fastest = f"{c['min_ratio']:.3f}x" if "min_ratio" in c else ""
            holds = {True: "yes", False: "**no**", None: "not measured"}[c["holds"]]
            lines.append(f"| {c['check']} | {measured} | {fastest} | {holds} |")
        lines.append("")
    agree = [r for r in records if r["measure"] == "agreement"]
    if agree:
        lines.append(
            "Agreement with the hooks reference before timing (max |logit diff|, same greedy tokens): "
            + "; ".join(f"{r['variant']} {r['max_abs_logit_diff']:.2g}" + ("" if r["same_tokens"] is None else (", same" if r["same_tokens"] else ", **different**")) for r in agree)
            + f". The adapters move logits by up to {agree[0]['adapter_effect']:.2g}."
        )
        lines.append("")
    return "\n".join(lines)
