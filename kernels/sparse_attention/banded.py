"""Sliding-window attention (+ sinks, + documents) on the CPU as one batched SDPA call.

The chunked kernel (chunked.py) walks query chunks and key pieces in Python with an
online softmax: memory-lean, but each piece is a handful of small torch ops. For the
causal sliding window the visible keys of a query chunk lie in a fixed band, so the whole
sequence can instead go through torch's fused SDPA (flash attention on the CPU, with its
own backward) in one call:

- queries are cut into chunks of C tokens (C >= window - 1);
- chunk i attends to the `n_prev` chunks before it and itself ((n_prev + 1) * C keys,
  built from shifted views of k/v), plus the sink keys in front;
- one boolean mask [C, n_sink + (n_prev + 1) * C] serves every chunk past the start; the
  first chunks (zero padding in front of the sequence, sinks that are also inside the
  window and must not count twice) get their own per-chunk masks in a second call.

Documents (cu_seqlens) are split off and run one by one (sinks and windows restart at each
document). Cost: about (n_prev + 1) * C / window key columns per visible one (1.5 for
window 1024), against S / window for dense causal; extra memory: n_prev + 1 copies of k/v,
which autograd keeps for the backward (the chunked kernel keeps none: it stays the path for
the longest sequences and for MoBA).

Same contract as `reference.sparse_attention` for the modes it takes (causal, no MoBA):
`supports` says which.

Legend: B batch, Hq/Hkv heads, S sequence, D head dim, C chunk, N chunks, K keys per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import AttnSpec, check_args

_CHUNK = 512  # query rows per chunk when the window allows (C = max(window - 1, ...) otherwise)
_MIN_CHUNK = 64


def supports(causal=True, window=None, sink_tokens=0, moba_topk=None, **_) -> bool:
    """True for the modes this path computes: causal with a sliding window (sinks and documents allowed)."""
    return bool(causal) and window is not None and moba_topk is None


def _chunk(window: int) -> int:
    """Chunk size: a multiple-of-64 size >= _MIN_CHUNK; chunks of _CHUNK once the window passes it."""
    if window - 1 <= _CHUNK:
        return max(_MIN_CHUNK, -(-(window - 1) // 64) * 64)
    return _CHUNK


def _visible(qpos, kpos, window: int, sinks: int, is_sink: torch.Tensor) -> torch.Tensor:
    """Boolean visibility of keys at kpos for queries at qpos (absolute positions in the document).
    Window keys: 0 <= kpos <= qpos and kpos > qpos - window. Sink copies: kpos <= qpos and outside
    the window (a sink inside the window is already one of the window keys)."""
    causal = kpos <= qpos
    in_window = kpos > qpos - window
    return torch.where(is_sink, causal & ~in_window, causal & in_window & (kpos >= 0))


def _one_document(q, k, v, window: int, sinks: int, scale: float):
    """Banded attention over one document [B, H, S, D] (no cu_seqlens)."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    C = _chunk(window)
    n_prev = -(-(window - 1) // C)
    N = -(-S // C)
    pad_end = N * C - S
    s = min(sinks, S)
    # keys of chunk i: the n_prev chunks before it and itself, from shifted views of the padded k/v
    def banded(t):
        tp = F.pad(t, (0, 0, n_prev * C, pad_end)).unflatten(2, (N + n_prev, C))  # [B, H, N + n_prev, C, D]
        kb = torch.cat([tp[:, :, j:j + N] for j in range(n_prev + 1)], dim=3)      # [B, H, N, (n_prev+1)C, D]
        if s:
            kb = torch.cat([t[:, :, None, :s].expand(-1, -1, N, -1, -1), kb], dim=3)
        return kb.transpose(1, 2).flatten(0, 1)                                      # [B*N, H, K, D]
    kb, vb = banded(k), banded(v)
    qb = F.pad(q, (0, 0, 0, pad_end)).unflatten(2, (N, C)).transpose(1, 2).flatten(0, 1)  # [B*N, Hq, C, D]
    K = kb.shape[2]
    dev = q.device
    i = torch.arange(N, device=dev)[:, None, None]
    qpos = i * C + torch.arange(C, device=dev)[None, :, None]                        # [N, C, 1]
    slot = torch.arange(K, device=dev)[None, None, :]
    is_sink = slot < s
    kpos = torch.where(is_sink, slot, (i - n_prev) * C + slot - s)                   # [N, 1, K]
    # Chunks from `first` on have the same relative mask (no front padding, sinks outside the window).
    first = min(N, max(n_prev, -(-(s + window) // C)))
    gqa = Hq != Hkv

    def attend(lo: int, hi: int, mask):  # chunks [lo, hi) of every batch row (views when B == 1)
        part = [t.unflatten(0, (B, N))[:, lo:hi].flatten(0, 1).contiguous() for t in (qb, kb, vb)]
        return F.scaled_dot_product_attention(*part, attn_mask=mask, scale=scale, enable_gqa=gqa)

    outs = []
    if first:
        m = _visible(qpos[:first], kpos[:first], window, s, is_sink)                 # [first, C, K]
        outs.append(attend(0, first, m[None].expand(B, -1, -1, -1).flatten(0, 1)[:, None]))
    if first < N:  # one [C, K] mask (chunk `first`'s) for all the rest
        outs.append(attend(first, N, _visible(qpos[first], kpos[first], window, s, is_sink[0])))
    ob = torch.cat([o.unflatten(0, (B, -1)) for o in outs], dim=1)                    # [B, N, Hq, C, D]
    return ob.transpose(1, 2).flatten(2, 3)[:, :, :S]


def sparse_attention(q, k, v, *, causal=True, window=None, sink_tokens=0, block_size=64,
                     moba_topk=None, cu_seqlens=None, scale=None):
    """Causal sliding-window attention (with sinks and documents) through torch SDPA, band by band."""
    if not supports(causal=causal, window=window, sink_tokens=sink_tokens, moba_topk=moba_topk):
        raise ValueError("the banded path computes causal sliding-window attention only (no MoBA, "
                         "not bidirectional); use the chunked or reference path for this mode")
    spec: AttnSpec = check_args(q, k, v, causal=causal, window=window, sink_tokens=sink_tokens,
                                block_size=block_size, moba_topk=moba_topk, cu_seqlens=cu_seqlens,
                                scale=scale)
    if spec.n_docs <= 1:
        return _one_document(q, k, v, spec.window, spec.sink_tokens, spec.scale)
    lengths = [b - a for a, b in zip(spec.cu[:-1], spec.cu[1:])]
    parts = zip(*(t.split(lengths, dim=2) for t in (q, k, v)))
    return torch.cat([_one_document(qd, kd, vd, spec.window, spec.sink_tokens, spec.scale) if qd.shape[2]
                      else qd for qd, kd, vd in parts], dim=2)
