"""Fused linear cross-entropy (LM head + CE without [N, V] logits): the GPU loss path.

`fused_linear_cross_entropy(hidden [N, D], weight [V, D], labels [N], *,
ignore_index=-100, chunk_size=1024, reduction="mean"|"sum")` -> scalar loss in
hidden's dtype. reference.py is the definition (full logits, pure PyTorch,
same signature); op.py the autograd op over token chunks; triton_ce.py the
Triton kernel (online logsumexp + softmax - onehot per row). Triton is imported
on first call, so importing this package needs no GPU.
"""
from __future__ import annotations


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index: int = -100, chunk_size: int = 1024,
                               reduction: str = "mean"):
    """The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); see op.py."""
    from .op import fused_linear_cross_entropy as impl
    return impl(hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size, reduction=reduction)


__all__ = ["fused_linear_cross_entropy"]
