#!/usr/bin/env bash
# Runs (or resumes) the NLU comparisons and copies their reports into benchmarks/results/compare_<task>-minilm/.
#   benchmarks/compare_nlu.sh [METHODS] [SEEDS] [NOISE]
#   default: lora,pissa,balora,balora-nosvd,balora-featsvd; 3 seeds; label noise 0,0.2,0.4
# One torch thread (OMP_NUM_THREADS=1, set here unless already set): the runs are small and one thread per process
# leaves the second core to another job. Finished runs are reused, so a second call with more methods only trains
# the new ones; comparison.md states the command that produced it.
set -euo pipefail
cd "$(dirname "$0")/.."
methods="${1:-lora,pissa,balora,balora-nosvd,balora-featsvd}"
seeds="${2:-3}"
noise="${3:-0,0.2,0.4}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for task in sst2 cola; do
  out="runs/compare/${task}-minilm"
  .venv/bin/python -m balora compare "configs/compare/${task}-minilm.yaml" --methods "$methods" --seeds "$seeds" \
    --label-noise "$noise" --output-dir "$out"
  dest="benchmarks/results/compare_${task}-minilm"
  mkdir -p "$dest"
  cp "$out/comparison.md" "$out/comparison.json" "$out/comparison.png" "$dest/"
done
