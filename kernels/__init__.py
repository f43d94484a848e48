"""Kernels, imported as `moetrain.kernels` (see DESIGN section 1).

`sparse_attention` is the dispatcher the model calls: the Triton kernels on
CUDA tensors, the memory-lean chunked PyTorch path otherwise. The same
signature is available as `moetrain.kernels.reference.sparse_attention`
(dense masks, the definition), `moetrain.kernels.triton.sparse_attention` and
`moetrain.kernels.chunked.sparse_attention`. Importing this package is cheap
and needs no GPU: Triton is imported on first CUDA call.
"""
import os as _os
import sys as _sys

if __name__ == "kernels":
    # Imported top-level because the repository root is on sys.path (`python -m pytest`,
    # `python -c` from the root, a script that inserts the root). The name belongs to Hugging
    # Face's `kernels` package, which transformers imports when it is installed: hand the
    # name over to that package instead of shadowing it.
    import importlib.machinery as _machinery
    import importlib.util as _util
    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ImportError("no package 'kernels' is installed (moetrain's kernels/ folder is imported as "
                          "moetrain.kernels, never as kernels)", name="kernels")
    _hub = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _hub  # `import kernels` returns what sys.modules holds when this ends
    _spec.loader.exec_module(_hub)
else:
    # Bind the subpackage before defining the function of the same name: Python sets
    # a parent attribute only when a submodule is first loaded, so loading it here
    # means later imports (e.g. of .sparse_attention.op) cannot overwrite the function.
    # Consequence: write `from moetrain.kernels.sparse_attention import op`; the form
    # `import moetrain.kernels.sparse_attention.op as op` walks attributes and finds the function.
    from . import sparse_attention as _sparse_attention_pkg  # noqa: F401


def sparse_attention(q, k, v, *, causal=True, window=None, sink_tokens=0, block_size=64,
                     moba_topk=None, cu_seqlens=None, scale=None):
    """Sparse attention, q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D] (DESIGN, section 2).

    Triton on CUDA; on CPU the chunked path, which never builds an [S, S] matrix.
    """
    if q.is_cuda:
        from .sparse_attention.op import sparse_attention as impl
    else:
        from .sparse_attention.chunked import sparse_attention as impl
    return impl(q, k, v, causal=causal, window=window, sink_tokens=sink_tokens,
                block_size=block_size, moba_topk=moba_topk, cu_seqlens=cu_seqlens, scale=scale)


__all__ = ["sparse_attention"]
