"""MoE token permute (gather by expert) and unpermute (weighted combine).

`permute(x_Td, src_S, pos_TK, backend=...)` and `unpermute(y_Sd, src_S, pos_TK,
w_TK=None, backend=...)`; index conventions in reference.py. backend:
"reference" (naive PyTorch, the ground truth), "torch" (PyTorch with
hand-written backwards, torch_ops.py), "triton" (kernels; CPU tensors need
TRITON_INTERPRET=1), or "auto" (Triton for CUDA tensors, "torch" otherwise).
Triton is imported only when used, so importing this package assumes no GPU.
"""
from __future__ import annotations

import os

from moetrain.kernels.moe_permute import reference, torch_ops

BACKENDS = ("auto", "torch", "triton", "reference")


def _impl(backend: str, is_cuda: bool):
    if backend not in BACKENDS:
        raise ValueError(f"moe permute backend '{backend}' is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if is_cuda else "torch"
    if backend in ("torch", "reference"):
        return torch_ops if backend == "torch" else reference
    if not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton permute kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         "use model.moe.permute_backend=torch or auto")
    from moetrain.kernels.moe_permute import triton_permute
    return triton_permute


def permute(x_Td, src_S, pos_TK, backend: str = "auto"):
    return _impl(backend, x_Td.is_cuda).permute(x_Td, src_S, pos_TK)


def unpermute(y_Sd, src_S, pos_TK, w_TK=None, backend: str = "auto"):
    return _impl(backend, y_Sd.is_cuda).unpermute(y_Sd, src_S, pos_TK, w_TK)


__all__ = ["permute", "unpermute", "reference", "BACKENDS"]
