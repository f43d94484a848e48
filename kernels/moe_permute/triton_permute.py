"""Triton permute / unpermute for MoE dispatch, with autograd.

Legend and index conventions as in reference.py (src_S, pos_TK). Both
directions are row gathers, so nothing needs atomics and results are
deterministic: the weighted scatter-add of unpermute is computed per token
as a sum over its K slots. Runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, scale_ptr, out_ptr, D, K: tl.constexpr, HAS_SCALE: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    # out[s] = src[idx[s] // K] * scale[idx[s]]
    s = tl.program_id(0).to(tl.int64)
    flat = tl.load(idx_ptr + s).to(tl.int64)
    row = flat // K
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr + flat).to(tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        m = cols < D
        v = tl.load(src_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32) * scale
        tl.store(out_ptr + s * D + cols, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _combine_rows_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, D, K: tl.constexpr, HAS_W: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # out[t] = sum_k w[t, k] * y[pos[t, k]] over kept slots (pos >= 0), accumulated in fp32
    t = tl.program_id(0).to(tl.int64)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        m = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            p = tl.load(pos_ptr + t * K + k).to(tl.int64)
            w = 1.0
            if HAS_W:
                w = tl.load(w_ptr + t * K + k).to(tl.float32)
            kept = (cols * 0 + p) >= 0  # vector form: the interpreter rejects scalar & block masks
            v = tl.load(y_ptr + tl.maximum(p, 0) * D + cols, mask=m & kept, other=0.0)
            acc += v.to(tl.float32) * w
        tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _combine_wgrad_kernel(y_ptr, pos_ptr, g_ptr, gw_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    # gw[t, k] = <y[pos[t, k]], g[t]> (0 for dropped slots): gradient of the combine weights
    t = tl.program_id(0).to(tl.int64)
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + t * K + k).to(tl.int64)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            m = (cols < D) & ((cols * 0 + p) >= 0)
            y = tl.load(y_ptr + tl.maximum(p, 0) * D + cols, mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + t * D + cols, mask=m, other=0.0).to(tl.float32)
            acc += y * g
        tl.store(gw_ptr + t * K + k, tl.sum(acc, axis=0).to(gw_ptr.dtype.element_ty))


def _block(d: int) -> int:
    return min(triton.next_power_of_2(max(d, 1)), 1024)


def gather_rows(src_Nd, idx_S, K: int, scale=None):
    src_Nd = src_Nd.contiguous()
    out = src_Nd.new_empty(idx_S.shape[0], src_Nd.shape[1])
    if out.numel():
        _gather_rows_kernel[(idx_S.shape[0],)](src_Nd, idx_S, scale if scale is not None else idx_S, out,
                                               src_Nd.shape[1], K=K, HAS_SCALE=scale is not None,
                                               BLOCK_D=_block(src_Nd.shape[1]))
    return out


def combine_rows(y_Sd, pos_TK, w_TK=None):
    y_Sd = y_Sd.contiguous()
    T, K = pos_TK.shape
    out = y_Sd.new_empty(T, y_Sd.shape[1])
    if out.numel():
        _combine_rows_kernel[(T,)](y_Sd, pos_TK, w_TK if w_TK is not None else pos_TK, out, y_Sd.shape[1],
                                   K=K, HAS_W=w_TK is not None, BLOCK_D=_block(y_Sd.shape[1]))
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Td, src_S, pos_TK):
        ctx.save_for_backward(pos_TK)
        return gather_rows(x_Td, src_S, pos_TK.shape[1])

    @staticmethod
    def backward(ctx, g_Sd):
        (pos_TK,) = ctx.saved_tensors
        return combine_rows(g_Sd, pos_TK), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_Sd, src_S, pos_TK, w_TK):
        w_TK = w_TK.contiguous() if w_TK is not None else None
        ctx.save_for_backward(y_Sd, src_S, pos_TK, w_TK)
        return combine_rows(y_Sd, pos_TK, w_TK)

    @staticmethod
    def backward(ctx, g_Td):
        y_Sd, src_S, pos_TK, w_TK = ctx.saved_tensors
        g_Td = g_Td.contiguous()
        K = pos_TK.shape[1]
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = gather_rows(g_Td, src_S, K, scale=w_TK)
        if w_TK is not None and ctx.needs_input_grad[3]:
            grad_w = torch.empty_like(w_TK)
            if grad_w.numel():
                _combine_wgrad_kernel[(pos_TK.shape[0],)](y_Sd.contiguous(), pos_TK, g_Td, grad_w, y_Sd.shape[1],
                                                          K=K, BLOCK_D=_block(y_Sd.shape[1]))
        return grad_y, None, None, grad_w


def permute(x_Td, src_S, pos_TK):
    return _Permute.apply(x_Td, src_S.contiguous(), pos_TK.contiguous())


def unpermute(y_Sd, src_S, pos_TK, w_TK=None):
    return _Unpermute.apply(y_Sd, src_S.contiguous(), pos_TK.contiguous(), w_TK)
