"""`moetrain.kernels.chunked.sparse_attention`: memory-lean PyTorch path (CPU default)."""
from .sparse_attention.chunked import sparse_attention

__all__ = ["sparse_attention"]
