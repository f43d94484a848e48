"""`moetrain.kernels.triton.sparse_attention`: the Triton autograd op.

Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before
triton was first imported. This module is `moetrain.kernels.triton`; the
absolute `import triton` inside `sparse_attention/` still finds the real
package because this file is only reachable through its package.
"""
from .sparse_attention.op import sparse_attention

__all__ = ["sparse_attention"]
