"""GQA attention with RoPE and a pluggable kernel backend.

Legend: B batch, S sequence, d model width, Hq/Hkv query/kv heads, D head dim.
Every backend has the signature of `moetrain.kernels.sparse_attention`:
fn(q_BHSD, k_BHSD, v_BHSD, *, causal, window, sink_tokens, block_size,
moba_topk, cu_seqlens, scale) -> o_BHSD.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.config import AttentionConfig, ModelConfig, head_dim
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import apply_rotary

_BACKENDS: dict[str, Callable] = {}
# Dense masks cost S*S; beyond this the CPU path switches to the banded or chunked kernel.
_SDPA_MASK_MAX_SEQ = 4096


def register_backend(name: str):
    def deco(fn):
        _BACKENDS[name] = fn
        return fn
    return deco


def get_backend(name: str) -> Callable:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; choose one of {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


def _is_sparse(window, sink_tokens, moba_topk) -> bool:
    return window is not None or moba_topk is not None


def _segments(cu: list[int]) -> list[tuple[int, int, list[int]]]:
    """Group consecutive documents into segments no longer than the longest
    document: (start, end, local cu_seqlens). Documents never attend to each
    other, so attention per segment is exact and costs sum(len^2), not S^2."""
    cap = max(b - a for a, b in zip(cu, cu[1:]))
    segs, start, bounds = [], cu[0], [0]
    for a, b in zip(cu, cu[1:]):
        if b - start > cap and a > start:
            segs.append((start, a, bounds))
            start, bounds = a, [0]
        bounds.append(b - start)
    segs.append((start, cu[-1], bounds))
    return segs


@register_backend("sdpa")
def sdpa_attention(q, k, v, *, causal=True, window=None, sink_tokens=0, block_size=64,
                   moba_topk=None, cu_seqlens=None, scale=None):
    """torch SDPA; sparse modes and document masking through the same dense
    mask the reference uses (an S x S bool matrix: for short sequences)."""
    gqa = q.shape[1] != k.shape[1]
    if cu_seqlens is not None and q.shape[0] == 1 and cu_seqlens.numel() > 2:
        kw = dict(causal=causal, window=window, sink_tokens=sink_tokens, block_size=block_size,
                  moba_topk=moba_topk, scale=scale)
        segs = _segments(cu_seqlens.tolist())
        if len(segs) > 1:
            outs = [sdpa_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **kw,
                                   cu_seqlens=torch.tensor(cu, dtype=torch.int32) if len(cu) > 2 else None)
                    for a, b, cu in segs]
            return torch.cat(outs, dim=2)
    if cu_seqlens is None and not _is_sparse(window, sink_tokens, moba_topk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    from moetrain.kernels.sparse_attention.common import check_args, moba_select
    from moetrain.kernels.sparse_attention.reference import dense_mask
    spec = check_args(q, k, v, causal=causal, window=window, sink_tokens=sink_tokens, block_size=block_size,
                      moba_topk=moba_topk, cu_seqlens=cu_seqlens, scale=scale)
    with torch.no_grad():  # the MoBA selection is not differentiated
        sel = moba_select(q, k, spec) if spec.moba else None
        mask = dense_mask(spec, q.shape[2], sel, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale, enable_gqa=gqa)


@register_backend("reference")
def reference_attention(q, k, v, **kw):
    from moetrain.kernels.reference import sparse_attention
    return sparse_attention(q, k, v, **kw)


@register_backend("triton")
def triton_attention(q, k, v, **kw):
    from moetrain.kernels.triton import sparse_attention
    return sparse_attention(q, k, v, **kw)


@register_backend("chunked")
def chunked_attention(q, k, v, **kw):
    from moetrain.kernels.chunked import sparse_attention
    return sparse_attention(q, k, v, **kw)


@register_backend("banded")
def banded_attention(q, k, v, **kw):
    from moetrain.kernels.sparse_attention.banded import sparse_attention
    return sparse_attention(q, k, v, **kw)


@register_backend("auto")
def auto_attention(q, k, v, **kw):
    """Triton on CUDA. On CPU: the causal sliding window through torch SDPA band by band
    (`banded`) once the sequence is over twice the window; else
    torch SDPA (dense mask when needed) up to _SDPA_MASK_MAX_SEQ tokens, where it is
    several times faster than the chunked kernel; beyond it the memory-lean chunked kernel
    (never an S x S matrix)."""
    if q.is_cuda:
        return triton_attention(q, k, v, **kw)
    from moetrain.kernels.sparse_attention.banded import supports
    if supports(**kw) and 2 * kw["window"] < q.shape[2]:
        return banded_attention(q, k, v, **kw)
    sparse = _is_sparse(kw.get("window"), kw.get("sink_tokens", 0), kw.get("moba_topk"))
    if q.shape[2] <= _SDPA_MASK_MAX_SEQ or (not sparse and kw.get("cu_seqlens") is None):
        return sdpa_attention(q, k, v, **kw)
    return chunked_attention(q, k, v, **kw)


def layer_kind(attn: AttentionConfig, layer_idx: int, n_layers: int) -> str:
    if layer_idx >= n_layers - attn.full_attention_last_n:
        return "full"
    return attn.layer_types[layer_idx % len(attn.layer_types)]


def kernel_kwargs(attn: AttentionConfig, kind: str) -> dict:
    """Kernel keyword arguments for one layer kind."""
    if kind == "full":
        return dict(window=None, sink_tokens=0, moba_topk=None, block_size=attn.block_size)
    if kind == "sliding":
        return dict(window=attn.window, sink_tokens=attn.sink_tokens, moba_topk=None, block_size=attn.block_size)
    return dict(window=None, sink_tokens=attn.sink_tokens, moba_topk=attn.moba_topk, block_size=attn.block_size)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_layers = layer_idx, cfg.n_layers
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, head_dim(cfg)
        d, D = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, d, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.set_pattern(cfg.attention)

    def set_pattern(self, attn: AttentionConfig) -> None:
        """Choose backend and sparsity for this layer (stages may change it)."""
        self.kind = layer_kind(attn, self.layer_idx, self.n_layers)
        self.backend = attn.backend
        self.kernel_kwargs = kernel_kwargs(attn, self.kind)
        self.doc_masking = attn.doc_masking

    def forward(self, x_BSd, cos, sin, cu_seqlens: Optional[torch.Tensor] = None):
        B, S, _ = x_BSd.shape
        q = self.q_proj(x_BSd).view(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(x_BSd).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x_BSd).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        o = self.core(q, k, v, cu_seqlens)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def core(self, q_BHSD, k_BHSD, v_BHSD, cu_seqlens: Optional[torch.Tensor] = None):
        """The attention itself on rotated q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D].
        The seam for sequence parallelism (moetrain/parallel/sequence.py wraps it in the
        Ulysses all-to-all from outside)."""
        fn = get_backend(self.backend)
        return fn(q_BHSD, k_BHSD, v_BHSD, causal=True, cu_seqlens=cu_seqlens if self.doc_masking else None,
                  **self.kernel_kwargs)
