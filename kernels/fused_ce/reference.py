"""Linear + cross-entropy, the definition: full fp32 logits, then F.cross_entropy.

Legend: N tokens, D width, V vocab. Same signature as the Triton op
(`moetrain.kernels.fused_ce.fused_linear_cross_entropy`); `chunk_size` is
accepted for that reason and unused here. Conventions shared by every path:
tokens whose label equals `ignore_index` contribute nothing; reduction="mean"
divides by the number of counted tokens, or by 1 when there are none (loss 0
and zero gradients, never NaN); the mean comes back in the dtype of `hidden`,
the sum in at least fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def loss_dtype(h_dtype: torch.dtype, reduction: str) -> torch.dtype:
    """The mean in hidden's dtype; the sum in at least fp32 (a sum over many tokens loses its digits in bf16)."""
    return h_dtype if reduction == "mean" else torch.promote_types(h_dtype, torch.float32)


def check_args(hidden, weight, labels, reduction: str) -> None:
    """Shape and option checks shared by the reference and the Triton op."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction='{reduction}' is not one of {', '.join(REDUCTIONS)}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"expected hidden [N, D], weight [V, D], labels [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"labels {tuple(labels.shape)}")


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index: int = -100, chunk_size: int = 1024,
                               reduction: str = "mean"):
    """CE of logits hidden @ weight.T [N, V] against labels [N], summed or averaged over counted tokens."""
    check_args(hidden, weight, labels, reduction)
    dt = torch.promote_types(hidden.dtype, torch.float32)  # fp64 inputs stay fp64 (tests' ground truth)
    logits_NV = hidden.to(dt) @ weight.to(dt).t()
    total = F.cross_entropy(logits_NV, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        total = total / (labels != ignore_index).sum().clamp_min(1)
    return total.to(loss_dtype(hidden.dtype, reduction))
