"""Triton row kernel of the fused linear cross-entropy: loss and d(loss)/d(logits) per token.

Legend: C tokens of one chunk, V vocab. One program per token row: an online
logsumexp over vocab tiles of BLOCK_V (fp32 running max and sum), the loss
lse - x[target], then in a second sweep the gradient softmax - onehot written
over the row (zero for ignored tokens). The output may alias the logits: each
tile is read before it is overwritten, and rows are independent. Runs on CPU
tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_rows_kernel(x_ptr, g_ptr, y_ptr, loss_ptr, V, stride_x, stride_g, ignore_index,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: C * V may exceed 2**31 elements
    x_row = x_ptr + row * stride_x
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    tgt = tl.where(valid, y, 0)
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    x_tgt = tl.load(x_row + tgt).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_tgt, 0.0))
    if WRITE_GRAD:
        g_row = g_ptr + row * stride_g
        keep = valid.to(tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < V
            x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - (cols == tgt).to(tl.float32)) * keep
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=inside)


def interpreting() -> bool:
    """True when the kernel was decorated under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_ce_rows_kernel, InterpretedFunction)


# Vocab tile under the CPU interpreter: small, so that tests cover several tiles and a ragged last one.
INTERPRET_BLOCK_V = 32


def ce_rows(x_CV, g_CV, labels_C, loss_C, ignore_index: int, write_grad: bool) -> None:
    """loss_C[i] = logsumexp(x_CV[i]) - x_CV[i, labels_C[i]] (0 where ignored), in fp32; with
    write_grad, g_CV[i] = softmax(x_CV[i]) - onehot(labels_C[i]) (0 where ignored). g_CV may be x_CV."""
    C, V = x_CV.shape
    if C == 0:
        return
    assert x_CV.stride(1) == 1 and g_CV.stride(1) == 1 and loss_C.dtype == torch.float32
    if interpreting():
        block_v, warps = min(INTERPRET_BLOCK_V, triton.next_power_of_2(V)), 4
    else:
        block_v = min(4096, triton.next_power_of_2(V))  # 16 fp32 values per thread at 8 warps
        warps = 8 if block_v >= 2048 else 4
    _ce_rows_kernel[(C,)](x_CV, g_CV, labels_C, loss_C, V, x_CV.stride(0), g_CV.stride(0), ignore_index,
                          WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=warps)
