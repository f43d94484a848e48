"""Autograd op and launchers for the Triton kernels (triton_fwd.py / triton_bwd.py).

On CUDA the block sizes are autotuned (per head dim, mask mode, GQA group and
power-of-two length bucket). Under TRITON_INTERPRET=1 (CPU tensors, tests) a
fixed small tiling is used instead, because Triton's autotuner needs a GPU.

Legend: B batch, Hq/Hkv query/kv heads, S sequence, D head dim, KP padded
number of MoBA slots per query (moba_topk - 1 rounded up to a power of two).
"""
from __future__ import annotations

import functools

import torch
import triton

from . import triton_bwd, triton_fwd
from .common import AttnSpec, check_args, moba_select

# Tile sizes used by the CPU interpreter; tests may patch this dict.
INTERPRET_TILES = {"BLOCK_M": 32, "BLOCK_N": 32}

_MAX_GRID_Y = 65535  # CUDA limit for grid axis 1 (= B * heads * documents here)


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton_fwd.sparse_attn_fwd, InterpretedFunction)


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps, stages); small BLOCK_N entries serve small MoBA blocks.
_FWD_CONFIGS = [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 32, 4, 4),
                _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 4), _cfg(128, 16, 4, 4), _cfg(64, 16, 4, 4)]
_DKDV_CONFIGS = [_cfg(32, 128, 4, 3), _cfg(64, 128, 8, 2), _cfg(32, 64, 4, 4), _cfg(64, 64, 4, 3),
                 _cfg(16, 64, 4, 4), _cfg(32, 32, 4, 4), _cfg(32, 16, 4, 4), _cfg(64, 16, 4, 3)]
_DQ_CONFIGS = [_cfg(128, 64, 8, 2), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 4),
               _cfg(64, 16, 4, 4), _cfg(128, 16, 4, 3)]
_TUNE_KEY = ["HEAD_DIM", "KP", "CAUSAL", "FULL", "WINDOW", "HAS_SINK", "MOBA", "GROUP",
             "len_bucket"]


def _moba_block_n(bs: int) -> int:
    """Largest power of two <= block_size (>= 16): MoBA key tiles should not overhang a block."""
    return max(16, 1 << (bs.bit_length() - 1))


def _prune(configs, named_args, **kwargs):
    if not kwargs.get("MOBA"):
        return configs
    cap = _moba_block_n(named_args["bs"])
    return [c for c in configs if c.kwargs["BLOCK_N"] <= cap] or configs[-1:]


@functools.cache
def _kernel(name: str):
    """The kernel itself (interpreter) or its autotuned wrapper (GPU)."""
    mod = triton_bwd if name.startswith("sparse_attn_bwd") else triton_fwd
    fn = getattr(mod, name)
    if interpreting():
        return fn
    configs = {"sparse_attn_fwd": _FWD_CONFIGS, "sparse_attn_bwd_dkdv": _DKDV_CONFIGS,
               "sparse_attn_bwd_dq": _DQ_CONFIGS}[name]
    return triton.autotune(configs=configs, key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune})(fn)


def _dot_precision(dtype) -> str:
    """fp32 inputs follow torch's TF32 switch (off by default: exact fp32); 16-bit ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_meta(spec: AttnSpec, q: torch.Tensor, kp: int) -> dict:
    """Compile-time switches shared by the three kernels (plus fixed tiles when interpreting)."""
    d = q.shape[-1]
    meta = dict(HEAD_DIM=d, DP=max(16, triton.next_power_of_2(d)), KP=kp, CAUSAL=spec.causal,
                FULL=spec.full, WINDOW=spec.window is not None, HAS_SINK=spec.sink_tokens > 0,
                MOBA=spec.moba, UPCAST=interpreting(), PREC=_dot_precision(q.dtype))
    if interpreting():
        meta.update(INTERPRET_TILES)
        if spec.moba:
            meta["BLOCK_N"] = min(meta["BLOCK_N"], _moba_block_n(spec.block_size))
    return meta


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and gap-free (any dim order): empty_like then keeps t's strides."""
    expect = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != expect:
            return False
        expect *= t.size(d)
    return True


def _prep(t: torch.Tensor, max_len: int) -> torch.Tensor:
    """Dense with unit stride in D (outputs/grads reuse the strides), int32-safe offsets.

    [B, S, H, D] memory viewed as [B, H, S, D] passes without a copy; slices of a
    fused qkv tensor or expanded gradients are copied.
    """
    if t.stride(-1) != 1 or not _dense(t) or max_len * t.stride(2) >= 2**31:
        t = t.contiguous()
    return t


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _scalars(spec: AttnSpec, S: int, heads: int, group: int, max_len: int):
    """Runtime scalars after the strides: S, n_docs, heads, GROUP, qk_scale, ..., len_bucket."""
    log2e = 1.4426950408889634
    return (S, spec.n_docs, heads, group, spec.scale * log2e, spec.window or 0, spec.sink_tokens,
            spec.block_size, max_len.bit_length())


def _forward(q, k, v, sel, cu, spec: AttnSpec, max_len: int, meta: dict):
    B, Hq, S, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    assert out.stride() == q.stride()
    grid = lambda m: (triton.cdiv(max_len, m["BLOCK_M"]), B * Hq * spec.n_docs)  # noqa: E731
    scal = _scalars(spec, S, Hq, Hq // k.shape[1], max_len)
    _kernel("sparse_attn_fwd")[grid](q, k, v, out, lse, sel, cu, *_strides(q), *_strides(k),
                                     *_strides(v), *_strides(out), *scal, **meta)
    return out, lse


def _delta(out, dout):
    """rowsum(dO * O) in fp32, [B, Hq, S]; one head at a time to bound the fp32 temporaries."""
    delta = torch.empty(out.shape[:3], dtype=torch.float32, device=out.device)
    for h in range(out.shape[1]):
        delta[:, h] = (dout[:, h].float() * out[:, h].float()).sum(-1)
    return delta


def _backward(dout, q, k, v, out, lse, sel, cu, spec: AttnSpec, max_len: int, meta: dict):
    B, Hq, S, _ = q.shape
    Hkv = k.shape[1]
    dout = _prep(dout, max_len)
    delta = _delta(out, dout)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    if spec.moba:  # key tiles are cut per MoBA block: (blocks per doc) x (tiles per block)
        bs = spec.block_size
        grid = lambda m: (triton.cdiv(max_len, bs) * triton.cdiv(bs, m["BLOCK_N"]),  # noqa: E731
                          B * Hkv * spec.n_docs)
    else:
        grid = lambda m: (triton.cdiv(max_len, m["BLOCK_N"]), B * Hkv * spec.n_docs)  # noqa: E731
    S_, n_docs, _, group, qk_scale, *rest = _scalars(spec, S, Hkv, Hq // Hkv, max_len)
    _kernel("sparse_attn_bwd_dkdv")[grid](q, k, v, dout, dk, dv, lse, delta, sel, cu, *strides,
                                          S_, n_docs, Hkv, group, qk_scale, spec.scale, *rest,
                                          **meta)
    grid = lambda m: (triton.cdiv(max_len, m["BLOCK_M"]), B * Hq * n_docs)  # noqa: E731
    _kernel("sparse_attn_bwd_dq")[grid](q, k, v, dout, dq, lse, delta, sel, cu, *strides,
                                        S_, n_docs, Hq, group, qk_scale, spec.scale, *rest, **meta)
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sel, spec):
        max_len = max(b - a for a, b in spec.docs())
        q, k, v = (_prep(t, max_len) for t in (q, k, v))
        cu = torch.tensor(spec.cu, dtype=torch.int32, device=q.device)
        meta = _launch_meta(spec, q, sel.shape[-1] if spec.moba else 1)
        out, lse = _forward(q, k, v, sel, cu, spec, max_len, meta)
        ctx.save_for_backward(q, k, v, out, lse, sel, cu)
        ctx.spec, ctx.max_len, ctx.meta = spec, max_len, meta
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sel, cu = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, sel, cu, ctx.spec, ctx.max_len, ctx.meta)
        return dq, dk, dv, None, None


def _padded_selection(q, k, spec: AttnSpec) -> torch.Tensor:
    """moba_select padded with -1 to a power-of-two width KP: int32 [B, Hq, S, KP]."""
    if not spec.moba:
        return torch.empty(1, dtype=torch.int32, device=q.device)
    sel = moba_select(q, k, spec)
    kp = triton.next_power_of_2(max(1, sel.shape[-1]))
    if kp != sel.shape[-1]:
        sel = torch.cat([sel, sel.new_full((*sel.shape[:3], kp - sel.shape[-1]), -1)], dim=-1)
    return sel.contiguous()


def sparse_attention(q, k, v, *, causal=True, window=None, sink_tokens=0, block_size=64,
                     moba_topk=None, cu_seqlens=None, scale=None):
    """Triton sparse attention (CUDA, or CPU tensors under TRITON_INTERPRET=1); see DESIGN 2."""
    spec = check_args(q, k, v, causal=causal, window=window, sink_tokens=sink_tokens,
                      block_size=block_size, moba_topk=moba_topk, cu_seqlens=cu_seqlens,
                      scale=scale, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if not q.is_cuda and not interpreting():
        raise ValueError("the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         "triton is first imported to run on CPU (slow; for tests). Use "
                         "moetrain.kernels.sparse_attention to pick the CPU path automatically.")
    n_programs = q.shape[0] * q.shape[1] * spec.n_docs
    if n_programs > _MAX_GRID_Y:
        raise ValueError(f"B * Hq * n_docs = {n_programs} exceeds {_MAX_GRID_Y}; split the batch")
    return _TritonAttention.apply(q, k, v, _padded_selection(q, k, spec), spec)
