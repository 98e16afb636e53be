#!/usr/bin/env bash
# The three evidence studies of docs/results.md, as two lanes of one-thread processes (a 2-core machine):
#   nlu = noise, then collapse: label noise (SST-2, noise 0 and 0.4), then class imbalance (SST-2, minority class at
#         5 %, then λ2 swept on seed 0)
#   nlg = drift, then drift_sweep: knowledge drift (SmolLM2-135M on GSM8K, retention on Alpaca and MBPP), then λ1
#         swept on seed 0
# Every run is reused when finished (balora compare), so an interrupted study resumes where it stopped.
# Usage: benchmarks/studies.sh FUNCTION [ARGS] (nlu, nlg, noise, collapse, drift, drift_sweep, lane8k_a, lane8k_b,
# report8k, noise8k, collapse8k, svd8k, collapse8k_sweep, mrpc_collapse, mrpc_clean, gsm8k_greedy, lr8k, noise8k_lr,
# collapse8k_lr, svd8k_lr, collapse8k_lr_sweep,
# collect; each function's arguments are in its comment). Results: runs/studies/*/, copied by `collect` to
# benchmarks/results/study_*/
set -euo pipefail
cd "$(dirname "$0")/.."
BALORA=${BALORA:-.venv/bin/balora}
export OMP_NUM_THREADS=1
noise() {
  $BALORA compare configs/studies/sst2-minilm.yaml --methods lora,pissa,balora --seeds 3 --label-noise 0,0.4 \
    --learning-rates 3e-4,1e-3,3e-3 --dev-rows 500 --output-dir runs/studies/noise
}
collapse() {  # the rates chosen on clean data by the noise study; then the λ2 sweep on seed 0 (reused runs linked)
  $BALORA compare configs/studies/sst2-minilm.yaml --methods lora,pissa,balora --seeds 3 --class-imbalance 0.05 \
    --rates-from runs/studies/noise/comparison.json --training.eval_strategy "'no'" --output-dir runs/studies/collapse
  mkdir -p runs/studies/collapse-sweep
  for m in lora pissa balora; do ln -sfn "../collapse/$m" "runs/studies/collapse-sweep/$m"; done
  $BALORA compare configs/studies/sst2-minilm.yaml --methods lora,pissa,balora --seeds 1 --class-imbalance 0.05 \
    --sweep balora.diversity_weight=0,3 --rates-from runs/studies/noise/comparison.json \
    --training.eval_strategy "'no'" --output-dir runs/studies/collapse-sweep
}
drift() {
  $BALORA compare configs/studies/gsm8k-smollm2.yaml --methods lora,pissa,balora --seeds 3 \
    --learning-rates 1e-4,4e-4 --dev-rows 32 --drift-samples 16 --diagnose-generations 0 \
    --output-dir runs/studies/drift
}
drift_sweep() {  # the λ1 sweep on seed 0; seed 0 of lora, pissa and balora is reused (linked from the drift study)
  mkdir -p runs/studies/drift-sweep
  for m in lora pissa balora; do ln -sfn "../drift/$m" "runs/studies/drift-sweep/$m"; done
  $BALORA compare configs/studies/gsm8k-smollm2.yaml --methods lora,pissa,balora --seeds 1 \
    --sweep balora.consistency_weight=0,0.4 --rates-from runs/studies/drift/comparison.json --drift-samples 16 \
    --diagnose-generations 0 --output-dir runs/studies/drift-sweep
}
# The NLU studies again at 8,000 rows x 2 epochs (configs/studies/sst2-minilm-8k.yaml), where clean SST-2 accuracy
# reaches the 0.85 bar; the rates are those chosen at 4,000 rows. Two lanes write disjoint runs:
#   lane8k_a = noise 0 (9 runs), then the class-imbalance runs of seeds 0 and 1
#   lane8k_b = noise 0.4 (9 runs), then the class-imbalance runs of seed 2, then BA-LoRA with λ3 = 0 and with the
#              paper's preset at noise 0.4 (seed 0, as one-value sweeps; lora, pissa and balora linked from noise-8k)
#   report8k = the reports over both lanes' runs (every run reused; only after both lanes finished)
RATES=benchmarks/results/study_noise/comparison.json
CFG8K=configs/studies/sst2-minilm-8k.yaml
noise8k() {  # $1: the label-noise list (default 0,0.4), $2: the seeds (default 3) (a count, or a comma list: "2," is seed 2 alone)
  $BALORA compare $CFG8K --methods lora,pissa,balora --seeds "${2:-3}" --label-noise "${1:-0,0.4}" --rates-from $RATES \
    --output-dir runs/studies/noise-8k
}
collapse8k() {  # $1: the seeds (default 3), $2: the minority shares (default 0.05,0.1)
  $BALORA compare $CFG8K --methods lora,pissa,balora --seeds "${1:-3}" --class-imbalance "${2:-0.05,0.1}" --rates-from $RATES \
    --training.eval_strategy "'no'" --output-dir runs/studies/collapse-8k
}
svd8k() {  # $1: svd_weight=0 (λ3 = 0) or preset=paper (the paper's literal NLU reading), as a one-value sweep; $2: the seeds (default 3)
  local out="runs/studies/noise-8k-${1%%=*}"
  mkdir -p "$out"
  for m in lora pissa balora; do ln -sfn "../noise-8k/$m" "$out/$m"; done
  $BALORA compare $CFG8K --methods lora,pissa,balora --seeds "${2:-3}" --label-noise 0.4 --sweep "balora.$1" \
    --rates-from $RATES --output-dir "$out"
}
collapse8k_sweep() {  # $1: KEY=v1,v2 of a balora.* key (diversity_weight=0,3: λ2; consistency_weight=0: λ1), $2: the seeds
  # (default 3), $3: the minority share (default 0.05); lora, pissa and balora linked from collapse-8k
  local out="runs/studies/collapse-8k-${1%%=*}"
  mkdir -p "$out"
  for m in lora pissa balora; do ln -sfn "../collapse-8k/$m" "$out/$m"; done
  $BALORA compare $CFG8K --methods lora,pissa,balora --seeds "${2:-3}" --class-imbalance "${3:-0.05}" --sweep "balora.$1" \
    --rates-from $RATES --training.eval_strategy "'no'" --output-dir "$out"
}
# The class-imbalance study on a second task, MRPC (configs/studies/mrpc-minilm.yaml): the minority class at 10 %, and
# the clean baseline (the whole training split as it is)
mrpc_collapse() {  # $1: the seeds (default 3), $2: the minority shares (default 0.1)
  $BALORA compare configs/studies/mrpc-minilm.yaml --methods lora,pissa,balora --seeds "${1:-3}" \
    --class-imbalance "${2:-0.1}" --rates-from $RATES --training.eval_strategy "'no'" --output-dir runs/studies/collapse-mrpc
}
mrpc_clean() {  # $1: the seeds (default 3)
  $BALORA compare configs/studies/mrpc-minilm.yaml --methods lora,pissa,balora --seeds "${1:-3}" --rates-from $RATES \
    --training.eval_strategy "'no'" --output-dir runs/studies/mrpc-clean
}
gsm8k_greedy() {  # $1: problems (default 50): greedy GSM8K accuracy of seed 0 of each drift-study method and of the
  # pre-trained model (a sanity check); then: .venv/bin/python benchmarks/gsm8k_greedy.py
  for m in balora pissa lora; do
    $BALORA eval --run runs/studies/drift/$m/noise-0/seed-0 --task gsm8k --limit "${1:-50}" --max-new-tokens 256 --batch-size 16
  done
  $BALORA eval configs/studies/gsm8k-smollm2.yaml --task gsm8k --limit "${1:-50}" --max-new-tokens 256 --batch-size 16 \
    --output-dir runs/studies/gsm8k-base-eval
}
lr8k() {  # $1: the methods (default lora,pissa,balora): the learning-rate selection again at the 8,000-row budget
  # (3e-4, 1e-3, 3e-3 on 500 held-out training rows, seed 0), then seed 0 at the chosen rate, trained in (or reused
  # from) noise-8k-lr8k, the noise study at these rates (noise8k_lr)
  local out=runs/studies/lr8k
  mkdir -p "$out"
  for m in lora pissa balora; do
    [ -e "runs/studies/noise-8k-lr8k/$m" ] || mkdir -p "runs/studies/noise-8k-lr8k/$m"
    ln -sfn "../noise-8k-lr8k/$m" "$out/$m"
  done
  $BALORA compare $CFG8K --methods "${1:-lora,pissa,balora}" --seeds 0, --label-noise 0 --learning-rates 3e-4,1e-3,3e-3 \
    --dev-rows 500 --output-dir "$out"
}
# The 8,000-row studies again at the rates chosen at 8,000 rows (lr8k; collected to $RATES8K). A method whose rate is
# the same as at 4,000 rows is linked from the earlier study, so only the others train.
RATES8K=${RATES8K:-benchmarks/results/study_lr8k/comparison.json}
link_same_rate() {  # $1: the new study folder, $2: the earlier one (its name under runs/studies)
  mkdir -p "$1"
  for m in lora pissa balora; do
    if ${PYTHON:-.venv/bin/python} -c 'import json, sys
a, b = (json.load(open(f))["lr_selection"]["chosen"] for f in sys.argv[1:3])
sys.exit(0 if a.get(sys.argv[3]) == b.get(sys.argv[3]) else 1)' "$RATES" "$RATES8K" "$m"; then
      [ -e "$1/$m" ] || ln -s "../$2/$m" "$1/$m"  # a folder already there (trained at a new rate) stays
    fi
  done
}
noise8k_lr() {  # $1: the label-noise list (default 0,0.4: what ran), $2: the seeds (default 3), $3: the methods (default all)
  link_same_rate runs/studies/noise-8k-lr8k noise-8k
  $BALORA compare $CFG8K --methods "${3:-lora,pissa,balora}" --seeds "${2:-3}" --label-noise "${1:-0,0.4}" \
    --rates-from $RATES8K --output-dir runs/studies/noise-8k-lr8k
}
collapse8k_lr() {  # $1: the seeds (default 3), $2: the minority shares (default 0.05: what ran), $3: the methods (default all)
  link_same_rate runs/studies/collapse-8k-lr8k collapse-8k
  $BALORA compare $CFG8K --methods "${3:-lora,pissa,balora}" --seeds "${1:-3}" --class-imbalance "${2:-0.05}" \
    --rates-from $RATES8K --training.eval_strategy "'no'" --output-dir runs/studies/collapse-8k-lr8k
}
svd8k_lr() {  # svd8k at the 8,000-row rates: $1 a balora.* KEY=V (svd_weight=0, consistency_weight=0, ...; a one-value
  # sweep at noise 0.4), $2: the seeds (default 3); lora, pissa and balora linked from noise-8k-lr8k
  local out="runs/studies/noise-8k-lr8k-${1%%=*}"
  mkdir -p "$out"
  for m in lora pissa balora; do ln -sfn "../noise-8k-lr8k/$m" "$out/$m"; done
  $BALORA compare $CFG8K --methods lora,pissa,balora --seeds "${2:-3}" --label-noise 0.4 --sweep "balora.$1" \
    --rates-from $RATES8K --output-dir "$out"
}
collapse8k_lr_sweep() {  # collapse8k_sweep at the 8,000-row rates: $1 KEY=v1,v2 of a balora.* key, $2: the seeds
  # (default 3), $3: the minority share (default 0.05); lora, pissa and balora linked from collapse-8k-lr8k
  local out="runs/studies/collapse-8k-lr8k-${1%%=*}"
  mkdir -p "$out"
  for m in lora pissa balora; do ln -sfn "../collapse-8k-lr8k/$m" "$out/$m"; done
  $BALORA compare $CFG8K --methods lora,pissa,balora --seeds "${2:-3}" --class-imbalance "${3:-0.05}" --sweep "balora.$1" \
    --rates-from $RATES8K --training.eval_strategy "'no'" --output-dir "$out"
}
lane8k_a() { noise8k 0 3; collapse8k 0,1; }
lane8k_b() { noise8k 0.4 3; collapse8k 2,; svd8k svd_weight=0; svd8k preset=paper; }
report8k() { noise8k 0,0.4 3; collapse8k 3; svd8k svd_weight=0; svd8k preset=paper; }
nlu() { noise; collapse; }
nlg() { drift; drift_sweep; }
collect() {  # copy each finished study's report into benchmarks/results/study_<name>/
  for name in noise collapse collapse-sweep drift drift-sweep noise-8k noise-8k-svd_weight noise-8k-preset collapse-8k \
      collapse-8k-diversity_weight collapse-8k-consistency_weight collapse-mrpc mrpc-clean lr8k noise-8k-lr8k collapse-8k-lr8k \
      noise-8k-lr8k-svd_weight noise-8k-lr8k-consistency_weight collapse-8k-lr8k-consistency_weight; do
    [ -f "runs/studies/$name/comparison.md" ] || { echo "runs/studies/$name: no report yet"; continue; }
    # the report again from the runs' stored figures, with this checkout's report code
    ${PYTHON:-.venv/bin/python} -c 'import json, sys; from pathlib import Path; from balora.compare import finish
out = Path(sys.argv[1]); finish(json.loads((out / "comparison.json").read_text()), out)' "runs/studies/$name"
    mkdir -p "benchmarks/results/study_$name"
    for f in comparison.md comparison.json comparison.png tradeoff.png curves.png; do
      [ -f "runs/studies/$name/$f" ] && cp "runs/studies/$name/$f" "benchmarks/results/study_$name/"
    done
    echo "benchmarks/results/study_$name"
  done
}
"$@"
