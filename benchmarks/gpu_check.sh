#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): bf16 training of the bundled NLG model with pissa and balora
# (step time, peak memory, finite losses), the teacher's exactness in bf16, PiSSA init time, and batched generation on
# 50 GSM8K problems. Estimated at a few minutes on one H100 (not yet run on a GPU); killed at 8 minutes. Results: $OUT (default
# benchmarks/results/gpu_check)/gpu_check.{json,md}, with the card named.
#
#   bash benchmarks/gpu_check.sh                      # on a GPU machine with balora's .venv and the bundled model
#   bash benchmarks/gpu_check.sh --dry-run            # anywhere: a tiny random model on the CPU (tests/test_gpu_check.py)
#
# Where the 540 MB checkpoint cannot travel (the device tool carries 64 MiB), run the same architecture with random
# weights: here, `.venv/bin/python benchmarks/gpu_check.py --prepare .gpu/smollm2` (config + tokenizer, a few MB, in a
# git-ignored folder), then on the machine, carrying .gpu:
#   bash benchmarks/gpu_check.sh --model .gpu/smollm2 --random-weights
# It needs torch, transformers and peft (0.21) there; datasets, gguf and TRL are not used.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 480 "$PY" benchmarks/gpu_check.py --out "${OUT:-benchmarks/results/gpu_check}" "$@"
