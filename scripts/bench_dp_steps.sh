#!/usr/bin/env bash
# Take every row of the DP-step table in one go, then regenerate the section of docs/performance.md.
# One row at a time, on an otherwise idle machine: the variants of a row are interleaved step
# by step, but a second heavy job on these 2 cores still skews a row's ratios by several percent.
# About 30 minutes on 2 CPU cores. Needs the bench extra: pip install ".[bench]" (dp-lora).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
PY=${PYTHON:-$PWD/.venv/bin/python}
OUT=${1:-results/perf}
mkdir -p "$OUT"
COMMON=(--steps 24 --mem-steps 3 --dp-lora)

row() {
  local name=$1; shift
  echo "== $name: bench_dp_step.py $* ${COMMON[*]}"
  "$PY" scripts/bench_dp_step.py "$@" "${COMMON[@]}" 2>&1 | grep -v "Loading weights" > "$OUT/dp-step-$name.txt"
  tail -1 "$OUT/dp-step-$name.txt"
}

row vanilla
row ffa --lora ffa
row bnb-4bit --quantization 4 --batch 16
row bnb-8bit --quantization 8 --batch 16
row smollm2-no-head --overrides "model=smollm2" --keep-layers 4 --batch 8
row smollm2-ffa-no-head --lora ffa --overrides "model=smollm2" --keep-layers 4 --batch 8
"$PY" scripts/readme_performance.py "$OUT" --doc docs/performance.md > /dev/null
echo "docs/performance.md performance section regenerated from $OUT"
