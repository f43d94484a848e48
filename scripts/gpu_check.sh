#!/usr/bin/env bash
# GPU validation in one call, at most ~10 minutes on one H100/H200. Never run in CI.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # on the GPU machine (default: $OUT, else gpu_check_out)
#   bash scripts/gpu_check.sh --cpu [OUT_DIR]    # reduced shapes on CPU: checks the script itself
#
# Stages, each under its own time limit, logs in OUT_DIR/<stage>.log and exit codes in .rc:
#   pytest     the GPU-marked tests (pytest -m gpu)
#   attention  scripts/bench_attention.py: dense causal at 16k hd128 in TFLOP/s; window and
#              MoBA against dense causal at 32k-128k
#   smoke      bf16 training steps of the node config's model shape ($CONFIG, $LAYERS layers
#              instead of 24 so that weights + AdamW fit one GPU): tokens/s and MFU
#   search     the longest trainable sequence on one GPU with every memory tool on
#              (checkpointing, offload, tiled MoE; sliding attention in every layer so one
#              try stays in seconds): bench_vs_hf.py's doubling + bisection on cuda
# and at the end one table with the issue's GPU targets (bench_vs_hf.py --gpu-summary).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; shift; fi
OUT=${1:-${OUT:-gpu_check_out}}
CONFIG=${CONFIG:-configs/h100_moe1b_zero2.yaml}
LAYERS=${LAYERS:-4}
PY=${PYTHON:-python}  # the project's venv when there is one and PYTHON is not set
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
mkdir -p "$OUT"
rm -f "$OUT"/*.rc "$OUT"/*.json

stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, keep its log and exit code
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo $? > "$OUT/$name.rc"
    tail -n 25 "$OUT/$name.log"
}

if [[ $MODE == gpu ]]; then
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA GPU visible; on CPU run: bash scripts/gpu_check.sh --cpu" >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null
    DEV=(--device cuda)
    ATTN=(--seq-lens 16384,32768,65536,131072 --head-dim 128 --modes causal,window,moba --no-flex)
    SMOKE=(--config "$CONFIG" --set "model.n_layers=$LAYERS" --seq-lens 4096,16384 --steps 3)
    SEARCH=(--config "$CONFIG" --set "model.n_layers=$LAYERS" --seq-lens 524288 --budget-gb 200
            --max-search-len 2097152 --search-granule 262144 --point-timeout 120
            --tile-tokens 8192 --loss-chunk 1024)  # GPU-sized tiles (the CPU defaults are 1024 / 256)
    LIMITS=(140 110 90 230)
else
    echo "cpu (reduced shapes)" > "$OUT/gpu.txt"
    DEV=(--device cpu)
    ATTN=(--cpu-smoke --seq-lens 256 --modes causal,window,moba)
    TINY=(--set model.hidden_size=64 --set model.n_heads=4 --set model.n_kv_heads=2
          --set model.intermediate_size=64 --set model.moe.n_experts=4 --set model.moe.top_k=2
          --set model.moe.intermediate_size=32 --set model.vocab_size=512 --set model.loss_chunk_size=128
          --set model.attention.window=64)
    SMOKE=(--config "$CONFIG" --set model.n_layers=2 "${TINY[@]}" --seq-lens 256 --steps 1)
    SEARCH=(--config "$CONFIG" --set model.n_layers=2 "${TINY[@]}" --seq-lens 256 --budget-gb 4
            --max-search-len 1024 --search-granule 256 --tile-tokens 128 --point-timeout 120)
    LIMITS=(150 180 150 300)
fi

stage pytest "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
stage attention "${LIMITS[1]}" "$PY" scripts/bench_attention.py "${ATTN[@]}"
stage smoke "${LIMITS[2]}" "$PY" scripts/bench_vs_hf.py "${DEV[@]}" "${SMOKE[@]}" --variants cfg \
    --warmup 1 --no-search --json "$OUT/smoke.json"
stage search "${LIMITS[3]}" "$PY" scripts/bench_vs_hf.py "${DEV[@]}" "${SEARCH[@]}" --variants sliding+mem \
    --search-variants sliding+mem --steps 1 --warmup 0 --json "$OUT/search.json"

echo
"$PY" scripts/bench_vs_hf.py --gpu-summary "$OUT" | tee "$OUT/summary.txt"
