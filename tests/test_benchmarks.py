"""The benchmark suite runs end to end and times the right thing: a smoke test, never a timed one.

`benchmarks/run.py --config tiny` runs in a subprocess, as a user runs it, and
its records are read back: every variant agreed with the plain-hook reference
before any timing, every measure holds each variant's repeats, and `pool.py`
pools them into the paired ratios computed here by hand. No time is compared
with a target: speed lives in `benchmarks/reports`, measured side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
REPEATS = 2
VARIANTS = {"toolbox", "toolbox-merged", "peft-in-nnsight", "peft", "hooks", "nnsight", "nnsight-base", "base"}
TRAINERS = {"toolbox", "peft-in-nnsight", "peft", "hooks", "nnsight"}

pytest.importorskip("peft")
pytest.importorskip("tqdm")


def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, cwd=cwd
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "tiny.jsonl"
    done = run(sys.executable, str(BENCHMARKS / "run.py"), "--config", "tiny", "--repeats", str(REPEATS), "--loop-steps", "8", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def import_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def by_measure(path: Path, measure: str) -> dict[str, dict]:
    return {r["variant"]: r for r in records(path) if r["measure"] == measure}


@pytest.mark.slow
def test_every_variant_computes_what_the_hooks_compute(tiny_run):
    agreement = by_measure(tiny_run, "agreement")
    assert set(agreement) == VARIANTS
    for variant, record in agreement.items():
        # the adapters change the logits, so agreeing is not agreeing on the base model
        assert record["adapter_effect"] > 1e-3
        assert record["max_abs_logit_diff"] < 1e-4, variant
        if variant not in ("base", "nnsight-base"):
            assert record["same_tokens"] is True, variant


def test_peft_in_nnsight_runs_peft_layers_inside_the_traced_model():
    """The variant is PEFT's own layers under nnsight's `peft=`, loaded from `export_peft`'s files,
    not the package computing the same numbers: the agreement above would not tell them apart."""
    from peft.tuners.lora import LoraLayer

    configs, variants = import_benchmark("configs"), import_benchmark("variants")
    config = configs.build_config("tiny")
    models = variants.build_models(config)
    init = variants.adapter_init(models.nnsight, config.targets, config.r, config.seed)
    variant = variants.build_variants(models, init, config.r, ("peft-in-nnsight",))["peft-in-nnsight"]

    assert variant.model is not models.nnsight and variant.model._module is not models.raw
    assert variant.model.peft == variant.directory.name  # attached through `peft=`
    assert {p.name for p in Path(variant.directory.name).iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    for path, (a, b) in init.weights.items():
        layer = variant.model._module.get_submodule(path)
        assert isinstance(layer, LoraLayer)
        assert torch.equal(layer.lora_A["default"].weight, a.T) and torch.equal(layer.lora_B["default"].weight, b.T)
        assert layer.scaling["default"] == 1.0
    assert len(variant.parameters()) == 2 * len(init.paths) and all(p.requires_grad for p in variant.parameters())
    assert not any(isinstance(m, LoraLayer) for m in models.raw.modules())  # the other copies stay bare


@pytest.mark.slow
def test_each_measure_times_every_variant_in_paired_rounds(tiny_run):
    meta = records(tiny_run)[0]
    assert meta["measure"] == "meta" and "partial" not in meta
    assert {"torch", "nnsight", "peft", "transformers"} <= set(meta["versions"])
    assert meta["device_name"].startswith("CPU") and meta["dtype"] == "float32"
    for measure, expected in (("train_step", TRAINERS), ("forward", VARIANTS), ("generate", VARIANTS)):
        timed = by_measure(tiny_run, measure)
        assert set(timed) == expected, measure
        for variant, record in timed.items():
            assert len(record["times_ms"]) == REPEATS and all(t > 0 for t in record["times_ms"])
            assert record["median_ms"] == pytest.approx(statistics.median(record["times_ms"]), abs=1e-3)  # times_ms: rounded to µs
        assert timed["peft"]["ratio_to_peft"] == 1.0
        assert timed["peft-in-nnsight"]["ratio_to_peft_in_nnsight"] == 1.0
        assert "ratio_to_peft_in_nnsight" in timed["toolbox"]

    many = [r for r in records(tiny_run) if r["measure"] == "generate_many"]
    assert {(r["variant"], r["adapters"]) for r in many} == {(v, n) for v in ("toolbox", "peft", "hooks") for n in (2, 8)}
    loop = by_measure(tiny_run, "steady_loop")["toolbox"]
    assert loop["steps"] == 8 and loop["memory_end_bytes"] > 0
    assert set(by_measure(tiny_run, "train_peak_memory")) == TRAINERS
    checks = [r for r in records(tiny_run) if r["measure"] == "bar"]
    assert any(c["check"].startswith("train_step: toolbox") for c in checks)
    assert {c["check"] for c in checks} >= {"train_step: toolbox <= 1.00x peft-in-nnsight", "generate: toolbox <= 1.00x peft-in-nnsight"}
    assert all(isinstance(c["holds"], bool) for c in checks)
    table = tiny_run.with_suffix(".md").read_text()
    assert "| bar | measured |" in table
    assert "Toolbox over PEFT inside nnsight (`peft=`), paired the same way: train step " in table


@pytest.mark.slow
def test_pool_pairs_each_round_with_peft(tiny_run, tmp_path):
    pool = import_benchmark("pool")
    second = tmp_path / "again.jsonl"
    shutil.copy(tiny_run, second)
    pooled = pool.pooled_ratios([tiny_run, second])
    generate = by_measure(tiny_run, "generate")
    by_hand = [t / p for t, p in zip(generate["toolbox"]["times_ms"], generate["peft"]["times_ms"])] * 2
    assert pooled[("generate", "toolbox")] == pytest.approx(by_hand)
    assert ("generate", "peft") not in pooled  # the reference is not a row of its own
    low, high = pool.bootstrap_interval(by_hand)
    assert low <= statistics.median(by_hand) <= high


def test_pool_divides_by_the_reference_it_is_given():
    """The README's comparison: the last recorded session, over PEFT inside nnsight, round by round."""
    pool = import_benchmark("pool")
    runs = sorted((BENCHMARKS / "reports" / "dispatch-gpt2-runs" / "493bdce").glob("run*.jsonl"))
    assert len(runs) == 6
    pooled = pool.pooled_ratios(runs, reference="peft-in-nnsight")
    generate = [by_measure(path, "generate") for path in runs]
    by_hand = [t / p for g in generate for t, p in zip(g["toolbox"]["times_ms"], g["peft-in-nnsight"]["times_ms"])]
    assert pooled[("generate", "toolbox")] == pytest.approx(by_hand)
    assert ("generate", "peft-in-nnsight") not in pooled and ("generate", "peft") in pooled
    assert f"{statistics.median(by_hand):.3f}" == "0.906"  # what the README shows
    assert "| generate | toolbox | 54 | 0.906x |" in pool.table(runs, "peft-in-nnsight")


@pytest.mark.slow
def test_pool_prints_the_table_and_draws_the_plot(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    image = tmp_path / "ratios.png"
    done = run(sys.executable, str(BENCHMARKS / "pool.py"), str(tiny_run), "--plot", str(image))
    assert done.returncode == 0, done.stderr
    assert "| generate | toolbox | 2 |" in done.stdout
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000

    missing = run(sys.executable, str(BENCHMARKS / "pool.py"), str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no such run file" in missing.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils")
def test_gpu_script_runs_every_step_and_returns_its_files(tmp_path):
    """`benchmarks/gpu/run.sh` on the tiny config: what one device call would bring back."""
    out = tmp_path / "out"
    done = run(
        "bash", "benchmarks/gpu/run.sh",
        env=dict(NO_INSTALL="1", PYTHON=sys.executable, CONFIGS="tiny tiny", OUT=str(out)),
        cwd=BENCHMARKS.parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("exit 0 after") == 5, done.stdout
    # "tiny tiny" names the 1B and 8B runs alike, so runs A and B each leave one file
    assert {p.name for p in out.iterdir()} == {"runs.log", "summary.md", "tiny-a.jsonl", "tiny-b.jsonl", "tiny-loop.jsonl"}
    sections = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("## tiny-")]
    assert sections == ["## tiny-a", "## tiny-a", "## tiny-b", "## tiny-b", "## tiny-loop"]
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back


def test_count_reads_one_total_per_dump_and_costs_each_adapter_call(tmp_path):
    count = import_benchmark("count")
    prefix = tmp_path / "toolbox.callgrind"
    for i, (measure, total) in enumerate([("forward", 700), ("generate", 5_000), ("generate_x2", 10_010)], start=1):
        (tmp_path / f"toolbox.callgrind.{i}").write_text(f"version: 1\ndesc: Trigger: dump {measure}\nsummary: {total}\ntotals: {total}\n")
    (tmp_path / "toolbox.callgrind").write_text("desc: Trigger: Program termination\ntotals: 0\n")  # the final, empty one
    assert count.read_dumps(prefix) == {"forward": 700, "generate": 5_000, "generate_x2": 10_010}

    counts = {
        "toolbox": {"generate": 5_000, "generate_x2": 10_010},
        "peft-in-nnsight": {"generate": 6_250},
        "peft": {"generate": 4_000},
        "nnsight-base": {"generate": 3_400},
    }
    records = count.records_of(counts, new_tokens=4, adapters=2)
    instructions = {r["variant"]: r for r in records if r["measure"] == "instructions"}
    toolbox, inside = instructions["toolbox"], instructions["peft-in-nnsight"]
    assert toolbox["ratio_to_peft"] == 1.25
    assert toolbox["ratio_to_peft_in_nnsight"] == 0.8
    assert toolbox["per_adapter_call"] == (5_000 - 3_400) / (4 * 2)  # 4 passes, 2 adapters each
    # PEFT's layers inside nnsight are costed over the same traced model without adapters
    assert inside["ratio_to_peft"] == 1.5625 and inside["per_adapter_call"] == round((6_250 - 3_400) / (4 * 2))
    assert next(r for r in records if r["measure"] == "linearity")["x2_over_x1"] == 2.002

    meta = dict(config="tiny", adapters=2, r=4, new_tokens=4)
    table = count.markdown(meta, records)
    assert "| generate | 0.0 | 1.250x | 1.562x | 1.000x | 0.850x |" in table
    assert "Toolbox over PEFT inside nnsight (`peft=`): generate 0.800x." in table


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("callgrind_control") is None, reason="needs valgrind")
def test_count_runs_under_callgrind_and_counts_the_whole_call(tmp_path):
    out = tmp_path / "count.jsonl"
    done = run(sys.executable, str(BENCHMARKS / "count.py"), "--config", "tiny", "--variants", "toolbox", "peft", "--new-tokens", "4", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counted = records(out)
    ops = {(r["variant"], r["op"]) for r in counted if r["measure"] == "instructions"}
    assert ops == {(v, op) for v in ("toolbox", "peft") for op in ("train_step", "forward", "generate")}
    assert all(r["instructions"] > 1_000_000 for r in counted if r["measure"] == "instructions")
    for check in (r for r in counted if r["measure"] == "linearity"):
        assert check["x2_over_x1"] == pytest.approx(2.0, abs=0.02), check  # greenlet switches did not stop the count
    assert "| generate |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_every_intervention_generates_what_its_hook_does_before_it_is_counted():
    done = run(sys.executable, str(BENCHMARKS / "count_interventions.py"), "--check", "--new-tokens", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every variant generates what its hook does" in done.stdout


def test_count_interventions_costs_each_call_over_its_own_base():
    sys.path.insert(0, str(BENCHMARKS))
    import count_interventions

    counts = {"base": 1000, "nnsight-base": 2000, "lora:hook": 1000 + 16 * 4 * 50, "lora:toolbox": 2000 + 16 * 4 * 52, "lora:toolbox-positions": 2000 + 16 * 4 * 60}
    per_pass = {name: 16 for name in counts if ":" in name}
    records = count_interventions.records_of(counts, per_pass, new_tokens=4)
    ratio = next(r for r in records if r["measure"] == "ratio_to_hook")
    assert ratio == dict(measure="ratio_to_hook", kind="lora", toolbox=1.04, toolbox_positions=1.2, positions_extra_per_call=8, within_bar=True)


def test_count_interventions_costs_the_package_over_the_same_hook_inside_nnsight():
    """Same tokens through the same nnsight: the difference over the calls, no base involved."""
    sys.path.insert(0, str(BENCHMARKS))
    import count_interventions

    counts = {"base": 1000, "nnsight-base": 2000, "steering:hook": 1000 + 64 * 20_000, "steering:toolbox": 9000 + 64 * 23_000, "steering:nnsight-hook": 9000 + 64 * 21_000}
    per_pass = {name: 16 for name in counts if ":" in name}
    records = count_interventions.records_of(counts, per_pass, new_tokens=4)
    ratio = next(r for r in records if r["measure"] == "ratio_to_hook")
    assert ratio["over_nnsight_hook_per_call"] == 2000
    assert "| +2.0 |" in count_interventions.markdown({"model": "m", "new_tokens": 4}, records)


def test_count_interventions_keeps_the_median_round_of_each_call():
    sys.path.insert(0, str(BENCHMARKS))
    import count_interventions

    dumps = {"base@0": 90, "base@1": 95, "base@2": 91, "lora:hook@0": 200, "lora:hook@1": 150, "lora:hook@2": 160}
    assert count_interventions.median_counts(dumps) == {"base": 91, "lora:hook": 160}


def test_count_interventions_counts_one_call_alone():
    """The isolated figure: the package's controller over nnsight's, and the hooked raw module over the raw one, per repeated call."""
    sys.path.insert(0, str(BENCHMARKS))
    import count_interventions

    calls = count_interventions.ISOLATED_CALLS
    counts = {
        "base": 1000, "nnsight-base": 2000, "soft-prompt:hook": 1000 + 4 * 10, "soft-prompt:toolbox": 2000 + 4 * 20,
        "soft-prompt:isolated-toolbox": 5000 + calls * 15, "soft-prompt:isolated-nnsight": 5000,
        "soft-prompt:isolated-hook": 3000 + calls * 10, "soft-prompt:isolated-raw": 3000,
    }  # fmt: skip
    per_pass = {"soft-prompt:hook": 1, "soft-prompt:toolbox": 1}
    records = count_interventions.records_of(counts, per_pass, new_tokens=4)
    ratio = next(r for r in records if r["measure"] == "ratio_to_hook")
    assert (ratio["isolated_toolbox"], ratio["isolated_hook"], ratio["isolated_ratio"]) == (15, 10, 1.5)
    assert ratio["within_bar"] is False
    assert not any(r.get("variant", "").startswith("isolated") for r in records)  # not whole generations
    assert "| 1.500x |" in count_interventions.markdown({"model": "m", "new_tokens": 4}, records)


def test_batched_benchmark_checks_every_row_then_times_every_variant(tmp_path):
    out = tmp_path / "batched"
    done = run(sys.executable, str(BENCHMARKS / "batched.py"), "--ks", "1", "2", "--repeats", "2", "--warmup", "0", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every row agrees with `peft-mixed`" in done.stdout and "every row agrees with `hook`" in done.stdout
    rows = [r for r in records(out.with_suffix(".jsonl")) if r["measure"] == "forward"]
    for kind, variants in (("lora", {"toolbox", "one-set", "peft-mixed", "hook"}), ("steering", {"toolbox", "one-set", "hook"})):
        for k in (1, 2):
            found = {r["variant"]: r for r in rows if r["kind"] == kind and r["k"] == k}
            assert set(found) == variants, (kind, k, sorted(found))
            assert all(len(r["times_ms"]) == 2 for r in found.values())
    table = out.with_suffix(".md").read_text()
    assert "| K | toolbox ms | over one set | over PEFT mixed | over hook |" in table
    assert out.with_suffix(".png").stat().st_size > 0
