#!/usr/bin/env bash
# Build .venv-trl: Hugging Face TRL (GRPOTrainer) in a venv of its own, for the peer race in
# bench/step_vs_trl.py (/work/shared/peers/trl_cpu_step.py). Kept apart from the main .venv so TRL's
# pins (datasets, accelerate, ...) never touch the project's environment. No Makefile needed:
#
#   bash scripts/trl_venv.sh [VENV_DIR]      (default .venv-trl; idempotent: a finished venv is kept)
#
# Order matters: torch 2.13.0 FIRST (the CPU wheel, from pip's find-links where the machine has it,
# else PyTorch's CPU index), then trl 1.16.0, which then keeps that torch instead of pulling a CUDA
# build from PyPI. trl 1.16.0 brings transformers 5.24.0, datasets, accelerate, tokenizers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-trl}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRL_VERSION="${TRL_VERSION:-1.16.0}"

if [ -f "$VENV/.complete" ]; then
  echo "$VENV is ready (delete $VENV to rebuild)"
  exit 0
fi
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q "torch==${TORCH_VERSION}+cpu" \
  || "$PIP" install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
"$PIP" install -q "trl==${TRL_VERSION}"
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print(f"trl {trl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
touch "$VENV/.complete"
