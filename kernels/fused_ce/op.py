"""Autograd op of the fused linear cross-entropy: GEMMs per token chunk + the Triton row kernel.

Legend: N tokens, D width, V vocab, C tokens per chunk. The loss is the last op
of the graph, so (as in Liger-Kernel's fused linear cross-entropy) forward also
computes the gradients, chunk by chunk, and backward only scales them by
grad_output (and 1/n for the mean): peak extra memory is one chunk of logits
[C, V] plus its gradient, never [N, V]. Per chunk:
    x_CV = h_CD @ w_VD.T          (cuBLAS; fp32 output where supported)
    loss_C, g_CV = ce_rows(x_CV)  (Triton: online logsumexp, softmax - onehot)
    dh_CD = g_CV @ w_VD           dw_VD += g_CV.T @ h_CD  (fp32 accumulator)
GEMM inputs stay in the input dtype (bf16 on GPU); accumulation is fp32.
"""
from __future__ import annotations

import functools

import torch

from . import triton_ce
from .reference import check_args, loss_dtype


@functools.cache
def _fp32_out_gemm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether bf16/fp16 GEMMs can write fp32 directly (torch.mm / addmm `out_dtype`, CUDA only,
    recent PyTorch): probed once with a numeric check, because the accepted operand dtypes
    changed between releases. Otherwise logits stay in the input dtype and dw is accumulated
    from per-chunk products."""
    if device_type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        a = torch.arange(6, device="cuda", dtype=dtype).reshape(2, 3) / 8
        acc = torch.ones(3, 3, device="cuda", dtype=torch.float32)
        torch.addmm(acc, a.t(), a, out_dtype=torch.float32, out=acc)
        x = torch.mm(a, a.t(), out_dtype=torch.float32)
        a32 = a.float()
        return bool(torch.allclose(acc, 1 + a32.t() @ a32) and torch.allclose(x, a32 @ a32.t())
                    and x.dtype == torch.float32)
    except (RuntimeError, TypeError):
        return False


def linear_ce_chunks(h_ND, w_VD, labels_N, ignore_index: int, chunk: int, need_dh: bool, need_dw: bool):
    """Summed loss (fp32 scalar) and the unscaled gradients of the summed loss that are asked for:
    dh [N, D] in the compute dtype, dw [V, D] in fp32 (None when not needed)."""
    (N, D), V = h_ND.shape, w_VD.shape[0]
    cdt = torch.promote_types(h_ND.dtype, w_VD.dtype)
    h, w, labels_N = h_ND.to(cdt).contiguous(), w_VD.to(cdt).contiguous(), labels_N.contiguous()
    fp32_out = _fp32_out_gemm(h.device.type, cdt)
    loss_N = torch.empty(N, dtype=torch.float32, device=h.device)
    need_grad = need_dh or need_dw
    dh = torch.empty(N, D, dtype=cdt, device=h.device) if need_dh else None
    dw = torch.zeros(V, D, dtype=torch.float32, device=h.device) if need_dw else None
    for s in range(0, N, chunk):
        h_c, e = h[s:s + chunk], min(s + chunk, N)
        x_CV = torch.mm(h_c, w.t(), out_dtype=torch.float32) if fp32_out else torch.mm(h_c, w.t())
        g_CV = x_CV  # the gradient overwrites the logits when the dtypes agree
        if need_grad and x_CV.dtype != cdt:
            g_CV = torch.empty(x_CV.shape, dtype=cdt, device=h.device)
        triton_ce.ce_rows(x_CV, g_CV, labels_N[s:e], loss_N[s:e], ignore_index, need_grad)
        if need_dh:
            torch.mm(g_CV, w, out=dh[s:e])
        if need_dw:
            if fp32_out:
                torch.addmm(dw, g_CV.t(), h_c, out_dtype=torch.float32, out=dw)
            elif cdt == torch.float32:
                dw.addmm_(g_CV.t(), h_c)
            else:  # one rounding per chunk product, the sum over chunks stays fp32
                dw += torch.mm(g_CV.t(), h_c)
        del x_CV, g_CV
    return loss_N.sum(), dh, dw


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, ignore_index: int, chunk: int, reduction: str, needs: tuple):
        # needs: which of dh, dw to compute (ctx.needs_input_grad ignores no_grad mode).
        V = w_VD.shape[0]
        counted = labels_N != ignore_index
        # Device-side check (no host sync): a label outside [0, V) would read outside the logits.
        torch._assert_async((((labels_N >= 0) & (labels_N < V)) | ~counted).all())
        total, dh, dw = linear_ce_chunks(h_ND, w_VD, labels_N, ignore_index, chunk, *needs)
        n = counted.sum().clamp_min(1).float() if reduction == "mean" else torch.ones((), device=h_ND.device)
        ctx.save_for_backward(dh, dw, n)
        ctx.dtypes = (h_ND.dtype, w_VD.dtype)
        return (total / n).to(loss_dtype(h_ND.dtype, reduction))

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw, n = ctx.saved_tensors
        # Shape [1], not a 0-dim tensor: a dimensioned fp32 operand makes the multiply run in fp32
        # and round once into the output dtype, with no fp32 copy of dh.
        scale = (grad_out.float() / n).reshape(1)
        gh = gw = None
        if ctx.needs_input_grad[0] and dh is not None:
            gh = torch.mul(dh, scale, out=torch.empty(dh.shape, dtype=ctx.dtypes[0], device=dh.device))
        if ctx.needs_input_grad[1] and dw is not None:
            gw = torch.mul(dw, scale, out=torch.empty(dw.shape, dtype=ctx.dtypes[1], device=dw.device))
        return gh, gw, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index: int = -100, chunk_size: int = 1024,
                               reduction: str = "mean"):
    """CE of logits hidden @ weight.T [N, V] against labels [N], computed in chunks of `chunk_size`
    tokens with the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    check_args(hidden, weight, labels, reduction)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return FusedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size, reduction, needs)
