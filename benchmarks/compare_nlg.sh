#!/usr/bin/env bash
# Runs (or resumes) the NLG comparison (SmolLM2-135M on GSM8K; GSM8K-test accuracy on 200 problems, drift on the
# Alpaca demo data) and copies its reports into benchmarks/results/compare_gsm8k-smollm2/.
# One torch thread (OMP_NUM_THREADS=1 unless set), so it can run beside benchmarks/compare_nlu.sh on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="runs/compare/gsm8k-smollm2"
.venv/bin/python -m balora compare configs/compare/gsm8k-smollm2.yaml --methods lora,pissa,balora --seeds 1 \
  --eval-task gsm8k --eval-limit 200 --eval-max-new-tokens 256 --output-dir "$out"
dest="benchmarks/results/compare_gsm8k-smollm2"
mkdir -p "$dest"
cp "$out/comparison.md" "$out/comparison.json" "$out/comparison.png" "$dest/"
