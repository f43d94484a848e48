"""LM head + cross-entropy in token chunks, never materialising [T x V] logits.

Legend: T tokens, d width, V vocab, C chunk. The loss is the last op of the
graph, so gradients w.r.t. hidden states and head weight are computed chunk by
chunk during forward and only scaled in backward (as in Liger's fused linear
cross-entropy): peak extra memory is one [C x V] block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_Td, w_Vd, labels_T, chunk: int):
        n_valid = (labels_T != IGNORE).sum().clamp_min(1)
        need_grad = h_Td.requires_grad or w_Vd.requires_grad
        grad_h = torch.zeros_like(h_Td) if need_grad else None
        grad_w = torch.zeros(w_Vd.shape, dtype=torch.float32, device=w_Vd.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h_Td.device)
        w32 = w_Vd.float()
        for s in range(0, h_Td.shape[0], chunk):
            h_c, y_c = h_Td[s:s + chunk].float(), labels_T[s:s + chunk]
            logits = h_c @ w32.t()
            valid = y_c != IGNORE
            tgt = y_c.clamp_min(0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, tgt[:, None]).squeeze(1)) * valid).sum()
            if need_grad:
                # d(CE)/d(logits) = softmax - onehot, zero on ignored rows.
                g = torch.softmax(logits, dim=-1)
                g.scatter_add_(1, tgt[:, None], -torch.ones_like(lse)[:, None])
                g *= valid[:, None]
                grad_h[s:s + chunk] = (g @ w32).to(h_Td.dtype)
                grad_w += g.t() @ h_c
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.dtypes = (h_Td.dtype, w_Vd.dtype)
        return (total / n_valid).to(h_Td.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out.float() / n_valid
        gh = (grad_h.float() * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = (grad_w * scale).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


def chunked_cross_entropy(h_Td, w_Vd, labels_T, chunk: int = 1024):
    """Mean next-token CE over labels != -100 of logits h @ w.T, in chunks."""
    return ChunkedLinearCrossEntropy.apply(h_Td, w_Vd, labels_T, chunk)


def plain_cross_entropy(h_Td, w_Vd, labels_T):
    """The materialised version, for tests and evaluation."""
    return F.cross_entropy((h_Td @ w_Vd.t()).float(), labels_T, ignore_index=IGNORE)
