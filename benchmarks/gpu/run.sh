#!/usr/bin/env bash
# The GPU bar in one command, sized for a 15-minute device lease (one call of
# at most 10 minutes). From the repository root, on the GPU machine, with the
# wheels of fetch-wheels.sh carried:
#
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=600)
#
# Runs, in this order, each under what is left of BUDGET seconds (default 540):
#   1. gpu-1b, run A: every measure but the 500-step loop, every variant
#      (PEFT inside nnsight, `peft-in-nnsight`, included)
#   2. gpu-8b, run A: train step, forward, generate, peak memory (without the
#      slow plain-nnsight column, which run 1 already reports for the 1B model,
#      nor `peft-in-nnsight`, whose fifth 16 GB copy of the 8B model and extra
#      column are what the 1B runs answer more cheaply)
#   3. gpu-1b, run B (with `peft-in-nnsight`) and 4. gpu-8b, run B: the same
#      three measures again, for the bar's "holds in both runs"
#   5. gpu-1b: the 500-step loop, if time is left
# Into $OUT (the device tool's folder that comes back, at most 8 files), or
# benchmarks/results when OUT is unset: each run's <config>-<run>.jsonl, all
# runs' markdown tables in summary.md, and their output in runs.log. A run cut
# short by the budget keeps, in its .jsonl, every measure it finished (the
# records after a "partial": true meta line; `pool.py` reads them).
#
# Locally, to check the script itself: NO_INSTALL=1 PYTHON=.venv/bin/python CONFIGS="tiny tiny" bash benchmarks/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}
WORK=$(mktemp -d)
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
read -r SMALL LARGE <<<"${CONFIGS:-gpu-1b gpu-8b}"
START=$SECONDS

if [ -z "${NO_INSTALL:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/runs.log"
"$PYTHON" -c "import torch, nnsight, peft, transformers; print('torch', torch.__version__, 'nnsight', nnsight.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" || exit 1

bench() {  # bench NAME CONFIG ARGS...: one run under the time that is left
  local name=$1 config=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 60 ]; then echo "skipped $name: ${left}s left of the budget"; return; fi
  echo "== $name ($config), up to ${left}s"
  timeout --signal=INT --kill-after=10 "$left" "$PYTHON" benchmarks/run.py --config "$config" --out "$WORK/$name.jsonl" "$@" \
    >"$WORK/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - START))s"
  { echo "== $name"; cat "$WORK/$name.log"; } >>"$OUT/runs.log"
  [ -e "$WORK/$name.jsonl" ] && cp "$WORK/$name.jsonl" "$OUT/"
  [ -e "$WORK/$name.md" ] && { echo "## $name"; echo; cat "$WORK/$name.md"; echo; } >>"$OUT/summary.md"
}

QUICK=(--repeats 5 --skip tokens many loop)
bench "$SMALL-a" "$SMALL" --repeats 5 --skip loop
bench "$LARGE-a" "$LARGE" "${QUICK[@]}" --variants toolbox toolbox-merged peft hooks nnsight-base base
bench "$SMALL-b" "$SMALL" "${QUICK[@]}" --variants toolbox toolbox-merged peft-in-nnsight peft hooks base
bench "$LARGE-b" "$LARGE" "${QUICK[@]}" --variants toolbox toolbox-merged peft hooks base
bench "$SMALL-loop" "$SMALL" --repeats 3 --skip tokens many --variants toolbox peft
[ -e "$OUT/summary.md" ] && cat "$OUT/summary.md"
