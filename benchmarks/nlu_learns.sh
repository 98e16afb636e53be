#!/usr/bin/env bash
# NLU runs with budgets where MiniLM learns the task (docs/results.md, "NLU that learns"): CoLA on its whole training
# set and SST-2 on 8,000 rows, PiSSA and BA-LoRA (default preset), one torch thread each. Runs go to runs/; a finished
# run (metrics.json present) is reused. Usage: benchmarks/nlu_learns.sh [cola|sst2]...
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--training.eval_strategy "'no'" --training.save_strategy "'no'" --training.logging_steps 50
        --training.disable_tqdm true)
run() {  # name config args...
  local out=$1 config=$2; shift 2
  [ -f "$out/metrics.json" ] && { echo "reusing $out"; return; }
  mkdir -p "$(dirname "$out")"
  OMP_NUM_THREADS=1 .venv/bin/balora train "$config" "${common[@]}" "$@" --output_dir "$out" > "$out.log" 2>&1
}
tasks=("$@"); [ ${#tasks[@]} -gt 0 ] || tasks=(cola sst2)
for task in "${tasks[@]}"; do
  for method in pissa balora; do
    case $task in
      cola) run "runs/cola_full/$method" configs/nlu/cola-minilm.yaml --data.max_length 64 \
              --training.learning_rate 3e-4 --balora.head_learning_rate 3e-3 --training.num_train_epochs 3 \
              --balora.method "$method" ;;
      sst2) run "runs/sst2_8k/${method}_e2" configs/nlu/sst2-minilm.yaml --data.max_train_samples 8000 \
              --data.max_length 64 --training.num_train_epochs 2 --balora.method "$method" ;;
    esac
  done
done
