#!/usr/bin/env bash
# The three evidence studies of docs/results.md, as two lanes of one-thread processes (a 2-core machine):
#   nlu: label noise (SST-2, noise 0 and 0.4), then class imbalance (SST-2, minority class at 5 %, λ2 swept)
#   nlg: knowledge drift (SmolLM2-135M on GSM8K, retention on Alpaca and MBPP), then the λ1 sweep
# Every run is reused when finished (balora compare), so an interrupted study resumes where it stopped.
# Usage: benchmarks/studies.sh nlu|nlg|collect   Results: runs/studies/*/, copied by `collect` to
# benchmarks/results/study_*/
set -euo pipefail
cd "$(dirname "$0")/.."
BALORA=${BALORA:-.venv/bin/balora}
export OMP_NUM_THREADS=1
nlu() {
  $BALORA compare configs/studies/sst2-minilm.yaml --methods lora,pissa,balora --seeds 3 --label-noise 0,0.4 \
    --learning-rates 3e-4,1e-3,3e-3 --dev-rows 500 --output-dir runs/studies/noise
  $BALORA compare configs/studies/sst2-minilm.yaml --methods lora,pissa,balora --seeds 3 --class-imbalance 0.05 \
    --sweep balora.diversity_weight=0,0.3,3 --rates-from runs/studies/noise/comparison.json \
    --training.eval_strategy "'no'" --output-dir runs/studies/collapse
}
nlg() {
  $BALORA compare configs/studies/gsm8k-smollm2.yaml --methods lora,pissa,balora --seeds 3 \
    --learning-rates 1e-4,4e-4 --dev-rows 32 --drift-samples 16 --diagnose-generations 0 \
    --output-dir runs/studies/drift
  # The sweep reuses seed 0 of lora, pissa and balora (finished above; a finished run is reused wherever it lies).
  mkdir -p runs/studies/drift-sweep
  for m in lora pissa balora; do ln -sfn "../drift/$m" "runs/studies/drift-sweep/$m"; done
  $BALORA compare configs/studies/gsm8k-smollm2.yaml --methods lora,pissa,balora --seeds 1 \
    --sweep balora.consistency_weight=0,0.4 --rates-from runs/studies/drift/comparison.json --drift-samples 16 \
    --diagnose-generations 0 --output-dir runs/studies/drift-sweep
}
collect() {  # copy each finished study's report into benchmarks/results/study_<name>/
  for name in noise collapse drift drift-sweep; do
    [ -f "runs/studies/$name/comparison.md" ] || { echo "runs/studies/$name: no report yet"; continue; }
    mkdir -p "benchmarks/results/study_$name"
    for f in comparison.md comparison.json comparison.png tradeoff.png curves.png; do
      [ -f "runs/studies/$name/$f" ] && cp "runs/studies/$name/$f" "benchmarks/results/study_$name/"
    done
    echo "benchmarks/results/study_$name"
  done
}
"$1"
