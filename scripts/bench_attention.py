"""Benchmark our sparse attention against torch SDPA and FlexAttention.

    python scripts/bench_attention.py --seq-lens 1024,4096,16384,65536,131072 --head-dim 128
    python scripts/bench_attention.py --cpu-smoke          # tiny CPU run of the table

For each sequence length and mask mode it times forward and forward+backward
and prints ms and TFLOP/s. FLOPs follow FlashAttention: 4*B*H*D per visible
(query, key) pair, i.e. 4*B*S^2*H*D dense and half that causal; backward is
counted as 2.5x forward. `eff` counts only the pairs the mask keeps;
`dense` charges every sparse mode the full causal cost (dense-equivalent).
`x causal` is the speed-up over SDPA dense causal at the same length.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moetrain.benchmark import time_ms  # noqa: E402
from moetrain.kernels import sparse_attention  # noqa: E402
from moetrain.kernels.sparse_attention.common import check_args, moba_select  # noqa: E402

MODES = ("causal", "window", "sink_window", "moba")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default=None, help="default 1024,...,131072 (256,1024 on CPU)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA; default = --heads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--moba-block", type=int, default=512)
    p.add_argument("--moba-topk", type=int, default=8)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: run tiny shapes on CPU (chunked path vs SDPA) to check the script")
    return p.parse_args(argv)


def mode_kwargs(mode: str, a) -> dict:
    return {"causal": {}, "window": {"window": a.window},
            "sink_window": {"window": a.window, "sink_tokens": a.sinks},
            "moba": {"moba_topk": a.moba_topk, "block_size": a.moba_block}}[mode]


def visible_pairs(S: int, mode: str, a) -> int:
    """Exact number of visible causal (i, j) pairs in one [S, S] head for each mode."""
    i = torch.arange(S, dtype=torch.float64)
    if mode == "causal":
        return S * (S + 1) // 2
    if mode in ("window", "sink_window"):
        n = torch.clamp(i + 1, max=a.window)
        if mode == "sink_window":  # sinks below the window start
            n += torch.clamp(i - a.window + 1, min=0).clamp(max=a.sinks)
        return int(n.sum())
    own = i - (i // a.moba_block) * a.moba_block + 1
    picked = torch.clamp(i // a.moba_block, max=a.moba_topk - 1) * a.moba_block
    return int((own + picked).sum())


def run_case(attn, q, k, v, fwd_only: bool, device):
    """(fwd ms, fwd+bwd ms or nan) for attn(q, k, v) -> out."""
    def fwd_step():
        with torch.no_grad():
            attn(q, k, v)
    fwd = time_ms(fwd_step, device)
    if fwd_only:
        return fwd, math.nan
    def step():
        out = attn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
    return fwd, time_ms(step, device)


def flex_attn(mode: str, q, k, a):
    """A compiled FlexAttention callable with the same mask, or None when unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    S = q.shape[2]
    W, n_sink, bs = a.window, a.sinks, a.moba_block
    if mode == "moba":
        spec = check_args(q, k, k, causal=True, window=None, sink_tokens=0, block_size=bs,
                          moba_topk=a.moba_topk, cu_seqlens=None, scale=None)
        sel = moba_select(q, k, spec)  # [B, Hq, S, K]
    def mask_mod(b, h, qi, kj):
        ok = qi >= kj
        if mode == "window":
            ok = ok & (qi - kj < W)
        elif mode == "sink_window":
            ok = ok & ((qi - kj < W) | (kj < n_sink))
        elif mode == "moba":
            vis = qi // bs == kj // bs
            for t in range(sel.shape[-1]):
                vis = vis | (sel[b, h, qi, t] == kj // bs)
            ok = ok & vis
        return ok
    heads = q.shape[1] if mode == "moba" else None
    mask = create_block_mask(mask_mod, q.shape[0], heads, S, S, device=q.device, _compile=True)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    return lambda q_, k_, v_: compiled(q_, k_, v_, block_mask=mask, enable_gqa=gqa)


def sdpa_causal(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def make_inputs(a, S, device, dtype):
    B, H, Hkv, D = a.batch, a.heads, a.kv_heads or a.heads, a.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda h: torch.randn(B, h, S, D, device=device, dtype=dtype, generator=g,  # noqa: E731
                               requires_grad=True)
    return mk(H), mk(Hkv), mk(Hkv)


def bench_length(a, S, device, dtype, rows):
    q, k, v = make_inputs(a, S, device, dtype)
    flops_unit = 4 * a.batch * a.heads * a.head_dim  # per visible pair, forward
    dense_pairs = visible_pairs(S, "causal", a)
    base = run_case(sdpa_causal, q, k, v, a.fwd_only, device)
    rows.append((S, "causal", "sdpa", *base, dense_pairs, dense_pairs, base))
    for mode in a.modes.split(","):
        kw = mode_kwargs(mode, a)
        pairs = visible_pairs(S, mode, a)
        ours = run_case(lambda q_, k_, v_, kw=kw: sparse_attention(q_, k_, v_, **kw), q, k, v,
                        a.fwd_only, device)
        rows.append((S, mode, "ours", *ours, pairs, dense_pairs, base))
        if a.no_flex or device.type != "cuda":
            continue
        try:
            flex = flex_attn(mode, q, k, a)
            res = run_case(flex, q, k, v, a.fwd_only, device) if flex else (math.nan, math.nan)
        except Exception as e:  # noqa: BLE001 - report and keep benchmarking
            print(f"  flex {mode} S={S}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
            res = (math.nan, math.nan)
        rows.append((S, mode, "flex", *res, pairs, dense_pairs, base))
    del q, k, v
    return flops_unit


def tflops(flop, ms):
    return flop / (ms * 1e-3) / 1e12 if ms == ms and ms > 0 else math.nan


def print_table(rows, flops_unit):
    hdr = (f"{'S':>7} {'mode':<12}{'impl':<6}{'fwd ms':>9}{'eff TF':>8}{'dense TF':>9}"
           f"{'x causal':>9}{'f+b ms':>10}{'eff TF':>8}{'dense TF':>9}{'x causal':>9}")
    print(hdr)
    print("-" * len(hdr))
    for S, mode, impl, fwd, fb, pairs, dense, base in rows:
        f_eff, f_den = flops_unit * pairs, flops_unit * dense
        print(f"{S:>7} {mode:<12}{impl:<6}{fwd:>9.2f}{tflops(f_eff, fwd):>8.3g}"
              f"{tflops(f_den, fwd):>9.3g}{base[0] / fwd:>9.2f}{fb:>10.2f}"
              f"{tflops(3.5 * f_eff, fb):>8.3g}{tflops(3.5 * f_den, fb):>9.3g}{base[1] / fb:>9.2f}")


def main(argv=None):
    a = parse_args(argv)
    if a.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        a.seq_lens, a.heads, a.kv_heads, a.head_dim = a.seq_lens or "256,1024", 2, 1, 64
        a.window, a.sinks, a.moba_block, a.moba_topk = 128, 16, 64, 3
    elif not torch.cuda.is_available():
        print("bench_attention: no CUDA GPU found; rerun on a GPU machine, "
              "or pass --cpu-smoke for a tiny CPU check of the script.")
        return 0
    else:
        device = torch.device("cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    a.seq_lens = a.seq_lens or "1024,4096,16384,65536,131072"
    bad = set(a.modes.split(",")) - set(MODES)
    if bad:
        raise SystemExit(f"unknown modes {sorted(bad)}; choose from {MODES}")
    rows, unit = [], 0
    for S in (int(s) for s in a.seq_lens.split(",")):
        try:
            unit = bench_length(a, S, device, dtype, rows)
        except torch.OutOfMemoryError:
            print(f"S={S}: out of memory, stopping here", file=sys.stderr)
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"B={a.batch} Hq={a.heads} Hkv={a.kv_heads or a.heads} D={a.head_dim} {dtype} "
          f"window={a.window} sinks={a.sinks} moba={a.moba_topk}x{a.moba_block} on {device}")
    print_table(rows, unit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
