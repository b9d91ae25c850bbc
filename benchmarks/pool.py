"""Pool several runs of one configuration: paired ratios to PEFT over every round, with a bootstrap interval.

One run's median of a handful of rounds moves by a few percent on a shared
machine; pooling the rounds of several runs narrows it. Run by hand::

    python benchmarks/pool.py benchmarks/results/cpu-a.jsonl benchmarks/results/cpu-b.jsonl

Prints a markdown table: per measure and variant, the median over all rounds
of the variant's time over PEFT's in the same round, and a 95% bootstrap
interval of that median.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

MEASURES = ("train_step", "forward", "generate")


def pooled_ratios(paths: list[Path], reference: str = "peft") -> dict[tuple[str, str], list[float]]:
    """Every round's time over the reference's, per ``(measure, variant)``, across the runs."""
    pooled: dict[tuple[str, str], list[float]] = {}
    for path in paths:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for measure in MEASURES:
            times = {r["variant"]: r["times_ms"] for r in records if r["measure"] == measure}
            if reference not in times:
                continue
            for variant, values in times.items():
                if variant != reference:
                    pooled.setdefault((measure, variant), []).extend(t / r for t, r in zip(values, times[reference]))
    return pooled


def bootstrap_interval(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of the median."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def table(paths: list[Path]) -> str:
    lines = [
        f"Pooled over {len(paths)} runs: median over rounds of time / PEFT's time in the same round, 95% bootstrap interval.",
        "",
        "| measure | variant | rounds | ratio to PEFT | 95% interval |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (measure, variant), values in sorted(pooled_ratios(paths).items(), key=lambda kv: (MEASURES.index(kv[0][0]), kv[0][1])):
        low, high = bootstrap_interval(values)
        lines.append(f"| {measure} | {variant} | {len(values)} | {statistics.median(values):.3f}x | {low:.3f} - {high:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON lines files written by run.py")
    print(table(parser.parse_args(argv).runs))


if __name__ == "__main__":
    main()
