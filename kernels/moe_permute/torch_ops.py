"""PyTorch permute / unpermute with hand-written backwards (the CPU fast path).

Same contract as reference.py; faster because nothing goes through advanced
indexing's accumulate-scatter: index_select forward, index_add_ backward for
the permute, and one batched [1 x K] @ [K x d] product per token (bmm) for the
weighted combine instead of materialising w * y.
"""
from __future__ import annotations

import torch


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Td, src_S, pos_TK):
        tok_S = src_S // pos_TK.shape[1]
        ctx.save_for_backward(tok_S)
        ctx.T = x_Td.shape[0]
        return x_Td.index_select(0, tok_S)

    @staticmethod
    def backward(ctx, g_Sd):
        (tok_S,) = ctx.saved_tensors
        return g_Sd.new_zeros(ctx.T, g_Sd.shape[1]).index_add_(0, tok_S, g_Sd), None, None


def _gather_TKd(y_Sd, pos_TK):
    T, K = pos_TK.shape
    return y_Sd.index_select(0, pos_TK.clamp_min(0).flatten()).view(T, K, y_Sd.shape[1])


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_Sd, src_S, pos_TK, w_TK):
        T, K = pos_TK.shape
        kept = pos_TK >= 0
        scale_TK = (kept.to(y_Sd.dtype) if w_TK is None else w_TK.to(y_Sd.dtype) * kept).contiguous()
        ctx.save_for_backward(y_Sd, src_S, pos_TK, scale_TK)
        ctx.has_w = w_TK is not None
        ctx.w_dtype = w_TK.dtype if w_TK is not None else None
        return torch.bmm(scale_TK.view(T, 1, K), _gather_TKd(y_Sd, pos_TK)).view(T, y_Sd.shape[1])

    @staticmethod
    def backward(ctx, g_Td):
        y_Sd, src_S, pos_TK, scale_TK = ctx.saved_tensors
        K = pos_TK.shape[1]
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:  # row s came from slot src_S[s]: its token's gradient times its weight
            grad_y = g_Td.index_select(0, src_S // K) * scale_TK.flatten().index_select(0, src_S)[:, None]
        if ctx.has_w and ctx.needs_input_grad[3]:
            dots = torch.bmm(_gather_TKd(y_Sd, pos_TK), g_Td.unsqueeze(-1)).squeeze(-1)
            grad_w = (dots * (pos_TK >= 0)).to(ctx.w_dtype)
        return grad_y, None, None, grad_w


def permute(x_Td, src_S, pos_TK):
    return _Permute.apply(x_Td, src_S, pos_TK)


def unpermute(y_Sd, src_S, pos_TK, w_TK=None):
    if y_Sd.shape[0] == 0:  # no rows at all (no tokens)
        return y_Sd.new_zeros(pos_TK.shape[0], y_Sd.shape[1])
    return _Unpermute.apply(y_Sd, src_S, pos_TK, w_TK)
