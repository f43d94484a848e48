"""LM head + cross-entropy without materialising [T x V] logits: chunked (CPU) or fused (GPU).

Legend: T tokens, d width, V vocab, C chunk. The loss is the last op of the
graph, so gradients w.r.t. hidden states and head weight are computed chunk by
chunk during forward and only scaled in backward (as in Liger's fused linear
cross-entropy): peak extra memory is one [C x V] block.

Two implementations with one contract, chosen by `linear_cross_entropy(impl=)`
(config key model.loss_impl): "chunked", the PyTorch path below (fp32 math,
runs anywhere), and "fused", moetrain.kernels.fused_ce (cuBLAS GEMMs in the
input dtype + a Triton kernel for the online logsumexp and the logits gradient);
"auto" takes the fused path on CUDA tensors. Both: labels == ignore_index
count for nothing; "mean" divides by the counted tokens (or 1 when none: loss
0, zero gradients); "sum" returns the sum, for callers that normalise by a
global token count (sequence parallelism); the mean has the dtype of h, the
sum at least fp32.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from moetrain.kernels.fused_ce.reference import loss_dtype

IGNORE = -100
LOSS_IMPLS = ("auto", "chunked", "fused")
REDUCTIONS = ("mean", "sum")


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_Td, w_Vd, labels_T, chunk: int, ignore_index: int, reduction: str, needs: tuple):
        # needs: (dh, dw) wanted; ctx.needs_input_grad does not see no_grad mode (eval).
        valid_T = labels_T != ignore_index
        n_valid = valid_T.sum().clamp_min(1) if reduction == "mean" else torch.ones((), device=h_Td.device)
        grad_h = torch.zeros_like(h_Td) if needs[0] else None
        grad_w = torch.zeros(w_Vd.shape, dtype=torch.float32, device=w_Vd.device) if needs[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h_Td.device)
        w32 = w_Vd.float()
        for s in range(0, h_Td.shape[0], chunk):
            h_c, tgt, valid = h_Td[s:s + chunk].float(), labels_T[s:s + chunk], valid_T[s:s + chunk]
            tgt = torch.where(valid, tgt, 0)
            # One exp pass over the [chunk, V] logits serves the loss and its gradient, in place.
            logits = h_c @ w32.t()
            logits -= logits.amax(dim=-1, keepdim=True)
            picked = logits.gather(1, tgt[:, None]).squeeze(1)        # target logit - row max
            e = logits.exp_()
            z = e.sum(dim=-1, keepdim=True)
            total += ((torch.log(z.squeeze(1)) - picked) * valid).sum()  # lse - target logit
            if needs[0] or needs[1]:
                # d(CE)/d(logits) = softmax - onehot, zero on ignored rows.
                g = e.div_(z)
                g.scatter_add_(1, tgt[:, None], -torch.ones_like(picked)[:, None])
                if not bool(valid.all()):
                    g[~valid] = 0.0
                if needs[0]:
                    grad_h[s:s + chunk] = (g @ w32).to(h_Td.dtype)
                if needs[1]:
                    grad_w.addmm_(g.t(), h_c)  # no [V, d] temporary per chunk
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.dtypes = (h_Td.dtype, w_Vd.dtype)
        return (total / n_valid).to(loss_dtype(h_Td.dtype, reduction))

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out.float() / n_valid
        gh = (grad_h.float() * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] and grad_h is not None else None
        gw = (grad_w * scale).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] and grad_w is not None else None
        return gh, gw, None, None, None, None, None


def _needs(h_Td, w_Vd) -> tuple:
    on = torch.is_grad_enabled()
    return (on and h_Td.requires_grad, on and w_Vd.requires_grad)


def chunked_cross_entropy(h_Td, w_Vd, labels_T, chunk: int = 1024, *, ignore_index: int = IGNORE,
                          reduction: str = "mean"):
    """Next-token CE over labels != ignore_index of logits h @ w.T, in chunks of `chunk` tokens."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction='{reduction}' is not one of {', '.join(REDUCTIONS)}")
    return ChunkedLinearCrossEntropy.apply(h_Td, w_Vd, labels_T, chunk, ignore_index, reduction,
                                           _needs(h_Td, w_Vd))


def _triton_usable(h_Td) -> bool:
    return (h_Td.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and \
        importlib.util.find_spec("triton") is not None


def linear_cross_entropy(h_Td, w_Vd, labels_T, *, chunk_size: int = 1024, impl: str = "auto",
                         ignore_index: int = IGNORE, reduction: str = "mean"):
    """CE of logits h @ w.T [T, V] against labels [T] without materialising them.

    impl: "chunked" (PyTorch), "fused" (Triton; CUDA tensors, or CPU under TRITON_INTERPRET=1),
    "auto" (fused on CUDA tensors when Triton is installed, chunked otherwise)."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss impl '{impl}' is not one of {', '.join(LOSS_IMPLS)} (model.loss_impl)")
    fused = impl == "fused" or (impl == "auto" and h_Td.is_cuda and _triton_usable(h_Td))
    if not fused:
        return chunked_cross_entropy(h_Td, w_Vd, labels_T, chunk_size, ignore_index=ignore_index,
                                     reduction=reduction)
    if not _triton_usable(h_Td):
        raise ValueError("model.loss_impl=fused needs Triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         "set model.loss_impl=auto or chunked")
    from moetrain.kernels.fused_ce import fused_linear_cross_entropy
    return fused_linear_cross_entropy(h_Td, w_Vd, labels_T, ignore_index=ignore_index, chunk_size=chunk_size,
                                      reduction=reduction)


def plain_cross_entropy(h_Td, w_Vd, labels_T):
    """The materialised version, for tests and evaluation."""
    return F.cross_entropy((h_Td @ w_Vd.t()).float(), labels_T, ignore_index=IGNORE)
