#!/usr/bin/env bash
# Runs (or resumes) the NLU comparisons and copies their reports into benchmarks/results/compare_<task>-minilm/.
#   benchmarks/compare_nlu.sh [SEEDS] [NOISE]      default: 3 seeds, label noise 0,0.4
# Finished runs are reused, so rerunning with fewer seeds only rebuilds the report from the runs already done
# (this is how the committed results were produced when the time ran out; comparison.md states the exact command).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-3}"
noise="${2:-0,0.4}"
for task in sst2 cola; do
  out="runs/compare/${task}-minilm"
  .venv/bin/balora compare "configs/compare/${task}-minilm.yaml" --methods lora,pissa,balora --seeds "$seeds" \
    --label-noise "$noise" --output-dir "$out"
  dest="benchmarks/results/compare_${task}-minilm"
  mkdir -p "$dest"
  cp "$out/comparison.md" "$out/comparison.json" "$out/comparison.png" "$dest/"
done
