#!/usr/bin/env bash
# Runs (or resumes) one NLU comparison and copies its reports into benchmarks/results/compare_<task>-minilm/.
#   benchmarks/compare_nlu.sh TASK [METHODS] [SEEDS] [NOISE]        TASK: sst2 or cola
#   default: lora,pissa,balora,balora-featsvd,full; 3 seeds; label noise 0,0.2,0.4; full at learning rate 1e-4
# Then the SVD ablation: balora against balora-nosvd (λ3 = 0) at seed 0, noise 0.4, in <task>-minilm-nosvd/.
# One torch thread per process (OMP_NUM_THREADS=1 unless set): the runs are small, and the two tasks and the NLG
# comparison can then run side by side on a 2-core machine. Finished runs are reused, so calling it again only
# trains what is missing; comparison.md states the command that produced it.
set -euo pipefail
cd "$(dirname "$0")/.."
task="$1"
methods="${2:-lora,pissa,balora,balora-featsvd,full}"
seeds="${3:-3}"
noise="${4:-0,0.2,0.4}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
full_lr=()
if [[ ",$methods," == *",full,"* ]]; then full_lr=(--full-learning-rate 1e-4); fi
out="runs/compare/${task}-minilm"
.venv/bin/python -m balora compare "configs/compare/${task}-minilm.yaml" --methods "$methods" --seeds "$seeds" \
  --label-noise "$noise" --output-dir "$out" "${full_lr[@]}"
dest="benchmarks/results/compare_${task}-minilm"
mkdir -p "$dest"
cp "$out/comparison.md" "$out/comparison.json" "$out/comparison.png" "$dest/"

.venv/bin/python -m balora compare "configs/compare/${task}-minilm.yaml" --methods balora,balora-nosvd --seeds 1 \
  --label-noise 0.4 --output-dir "${out}-nosvd"
mkdir -p "${dest}-nosvd"
cp "${out}-nosvd/comparison.md" "${out}-nosvd/comparison.json" "${out}-nosvd/comparison.png" "${dest}-nosvd/"
