"""`moetrain.kernels.reference.sparse_attention`: the pure-PyTorch definition (dense masks)."""
from .sparse_attention.reference import sparse_attention

__all__ = ["sparse_attention"]
