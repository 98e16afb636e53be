#!/usr/bin/env bash
# lm-evaluation-harness on balora's two exports of a short SmolLM2-135M run, offline (docs/eval.md, "Scoring with
# lm-eval and evalplus"): train STEPS steps of configs/nlg/gsm8k-smollm2.yaml in float32 (so that the two exports can
# agree to float32 round-off), export --to lora and --to merged, score
# the base, the adapter (peft=) and the merged model on configs/lm_eval/balora_gsm8k_answer (first LIMIT problems),
# the adapter on balora_gsm8k (generation, first GEN_LIMIT problems, 256 new tokens) and the same problems with
# `balora eval`, then write benchmarks/results/lm_eval_smollm2.{md,json}.
#   benchmarks/lm_eval_smollm2.sh [LIMIT] [GEN_LIMIT] [STEPS]   defaults 100, 8, 8; needs pip install 'balora[lm-eval]'
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
limit="${1:-100}"
gen_limit="${2:-8}"
steps="${3:-8}"
py="${PYTHON:-.venv/bin/python}"
lm_eval="$(dirname "$py")/lm_eval"
out=runs/lm_eval_smollm2
rm -rf "$out/lora" "$out/merged" "$out"/lm_eval-* "$out/run/eval-gsm8k"
"$py" -m balora train configs/nlg/gsm8k-smollm2.yaml --model.dtype float32 --training.max_steps "$steps" \
  --data.max_train_samples $((4 * steps)) --training.gradient_accumulation_steps 1 --training.save_strategy no \
  --output_dir "$out/run" --overwrite
"$py" -m balora export "$out/run" --to lora "$out/lora"
"$py" -m balora export "$out/run" --to merged "$out/merged"
base=$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['base_model_name_or_path'])" \
  "$out/lora/adapter_config.json")
common=(--include_path configs/lm_eval --device cpu --batch_size 8 --log_samples)
for what in base lora merged; do
  case "$what" in
    base) args="pretrained=$base" ;;
    lora) args="pretrained=$base,peft=$out/lora" ;;
    merged) args="pretrained=$out/merged" ;;
  esac
  /usr/bin/time -f "%e" -o "$out/lm_eval-$what.time" "$lm_eval" --model hf --model_args "$args" \
    --tasks balora_gsm8k_answer --limit "$limit" --output_path "$out/lm_eval-$what" "${common[@]}"
done
/usr/bin/time -f "%e" -o "$out/lm_eval-lora-gen.time" "$lm_eval" --model hf \
  --model_args "pretrained=$base,peft=$out/lora" --tasks balora_gsm8k --limit "$gen_limit" \
  --gen_kwargs max_gen_toks=256 --output_path "$out/lm_eval-lora-gen" "${common[@]}"
"$py" -m balora eval --run "$out/run" --task gsm8k --limit "$gen_limit" --max-new-tokens 256 --batch-size 8
"$py" benchmarks/lm_eval_report.py "$out" "$limit" "$gen_limit" "$steps" "$*"
