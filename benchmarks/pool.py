"""Pool several runs of one configuration: paired ratios to PEFT over every round, with a bootstrap interval.

One run's median of a handful of rounds moves by a few percent on a shared
machine; pooling the rounds of several runs narrows it. Run by hand::

    python benchmarks/pool.py benchmarks/results/cpu-a.jsonl benchmarks/results/cpu-b.jsonl
    python benchmarks/pool.py benchmarks/results/cpu-*.jsonl --plot ratios.png
    python benchmarks/pool.py benchmarks/results/cpu-*.jsonl --reference peft-in-nnsight

Prints a markdown table: per measure and variant, the median over all rounds
of the variant's time over PEFT's in the same round (``--reference`` names
another variant to divide by), and a 95% bootstrap interval of that median. ``--plot`` also draws them, with each run's own
median beside the pooled one (needs matplotlib).
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


def table(paths: list[Path], reference: str = "peft") -> str:
    name = "PEFT" if reference == "peft" else reference
    lines = [
        f"Pooled over {len(paths)} runs: median over rounds of time / {name}'s time in the same round, 95% bootstrap interval.",
        "",
        f"| measure | variant | rounds | ratio to {name} | 95% interval |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (measure, variant), values in sorted(pooled_ratios(paths, reference).items(), key=lambda kv: (MEASURES.index(kv[0][0]), kv[0][1])):
        low, high = bootstrap_interval(values)
        lines.append(f"| {measure} | {variant} | {len(values)} | {statistics.median(values):.3f}x | {low:.3f} - {high:.3f} |")
    return "\n".join(lines)


def run_label(path: Path) -> str:
    """The run's device and config, from its meta record, for a plot title."""
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("measure") == "meta":
            return f"{record.get('config', '?')} on {record.get('device_name', '?')}"
    return path.stem


def plot(paths: list[Path], out: Path, reference: str = "peft") -> None:
    """Draw the pooled ratios to PEFT (or ``reference``) with their intervals, one panel per measure, into ``out``.

    Each row is a variant: the dot is the median over every pooled round, the
    bar its 95% bootstrap interval, and the small grey marks each run's own
    median, so the spread between runs shows beside the pooled estimate.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(f"--plot needs matplotlib ({error}); install it with `pip install matplotlib`.") from None

    name = "PEFT" if reference == "peft" else reference
    pooled = pooled_ratios(paths, reference)
    per_run = [pooled_ratios([path], reference) for path in paths]
    measures = [m for m in MEASURES if any(key[0] == m for key in pooled)]
    if not measures:
        raise SystemExit(f"No timed measure with a {name} reference in {', '.join(map(str, paths))}: nothing to plot.")
    rows = {m: sorted(v for (measure, v) in pooled if measure == m) for m in measures}
    figure, axes = plt.subplots(
        len(measures), 1, sharex=True, squeeze=False,
        figsize=(7, 1.2 + 0.42 * sum(len(r) + 1 for r in rows.values())),
        gridspec_kw={"height_ratios": [len(rows[m]) for m in measures]},
    )
    for ax, measure in zip(axes[:, 0], measures):
        for y, variant in enumerate(rows[measure]):
            values = pooled[(measure, variant)]
            low, high = bootstrap_interval(values)
            colour = "tab:blue" if variant.startswith("toolbox") else "tab:grey"
            ax.plot([low, high], [y, y], color=colour, linewidth=2.5, solid_capstyle="butt")
            ax.plot(statistics.median(values), y, "o", color=colour, markersize=7, zorder=3)
            runs = [statistics.median(r[(measure, variant)]) for r in per_run if (measure, variant) in r]
            ax.plot(runs, [y + 0.28] * len(runs), "|", color="0.45", markersize=7)
        ax.axvline(1.0, color="tab:red", linewidth=1)
        ax.set_yticks(range(len(rows[measure])), rows[measure])
        ax.set_ylim(-0.6, len(rows[measure]) - 0.4)
        ax.invert_yaxis()
        ax.set_title(measure.replace("_", " "), loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(f"time / {name}'s time in the same round (red line: {name}; left of it is faster)", fontsize=9)
    labels = sorted({run_label(path) for path in paths})
    figure.suptitle(
        f"{'; '.join(labels)}: {len(paths)} run{'s' if len(paths) > 1 else ''}\n"
        "dot: median over all rounds, bar: its 95% interval, grey ticks: each run's median",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON lines files written by run.py")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw the ratios into this image")
    parser.add_argument("--reference", default="peft", help="the variant every time is divided by (default: raw PEFT)")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.runs if not path.is_file()]
    if missing:
        parser.error(f"no such run file: {', '.join(missing)}")
    print(table(args.runs, args.reference))
    if args.plot is not None:
        plot(args.runs, args.plot, args.reference)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
