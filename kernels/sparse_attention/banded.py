"""Sliding-window attention (+ sinks, + documents) on the CPU through torch's flash attention.

The chunked kernel (chunked.py) walks query chunks and key pieces in Python with an
online softmax: memory-lean, but each piece is a handful of small torch ops. For the
causal sliding window the visible keys of a query chunk lie in a fixed band, so many
chunks can go through torch's CPU flash attention (and its backward) in one call:

- queries are cut into chunks of C tokens (C >= window - 1);
- chunk i attends to the `n_prev` chunks before it and itself ((n_prev + 1) * C keys,
  built from shifted slices of k/v), plus the sink keys in front;
- one additive mask [C, n_sink + (n_prev + 1) * C] serves every chunk past the start; the
  first chunks (zero padding in front of the sequence, sinks that are also inside the
  window and must not count twice) get their own per-chunk masks in a call of their own;
- the rest go in slabs of _SLAB_TOKENS query rows, one flash call each. Autograd keeps
  only q, k, v, the output and its logsumexp; the backward rebuilds each slab's band and
  folds the band gradients back onto k and v. Extra memory is one slab's band, at any length.

Documents (cu_seqlens) are split off and run one by one (sinks and windows restart at each
document). Cost: about (n_prev + 1) * C / window key columns per visible one (1.25 for
window 1024), against S / window for dense causal. MoBA and bidirectional layers keep the
chunked kernel.

Same contract as `reference.sparse_attention` for the modes it takes (causal, no MoBA):
`supports` says which.

Legend: B batch, Hq/Hkv heads, S sequence, D head dim, C chunk, N chunks, K keys per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import AttnSpec, check_args

_CHUNK = 256  # query rows per chunk when the window allows (C = max(window - 1, ...) otherwise)
_MIN_CHUNK = 64
# Query rows per flash call: bounds the band copies, and the backward's transient memory
# (the op's gradient of the band, GQA-expanded, is about 5x the slab's keys). One layer of
# the issue-13 shape at 16k tokens, backward: 212 MiB extra at 16384 rows, 114 at 4096, 74 at
# 1024, the same time (1 thread: fwd 0.47 s, bwd 1.1-1.2 s for each).
_SLAB_TOKENS = 1024


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


def _rows(t, a: int, b: int):
    """t[:, :, a:b] with zero rows where [a, b) runs outside [0, S)."""
    S = t.shape[2]
    part = t[:, :, max(a, 0):min(b, S)]
    front, back = max(0, -a), max(0, b - S)
    return F.pad(part, (0, 0, front, back)) if front or back else part


class _Band:
    """Geometry of one document: chunks of C query rows; chunk i sees the n_prev chunks
    before it and itself, plus the s sink keys in front ([sinks | band] = K key slots)."""

    def __init__(self, S: int, window: int, sinks: int, device, dtype):
        self.S, self.window = S, window
        self.C = C = _chunk(window)
        self.n_prev = -(-(window - 1) // C)
        self.N = -(-S // C)
        self.s = min(sinks, S)
        self.K = self.s + (self.n_prev + 1) * C
        # Chunks from `first` on share one relative mask (no front padding, sinks outside the window).
        self.first = min(self.N, max(self.n_prev, -(-(self.s + window) // C)))
        self.slab = max(1, _SLAB_TOKENS // C)
        self.device, self.dtype = device, dtype
        self._shared = None  # the mask of every chunk from `first` on, built once

    def slabs(self):
        """[lo, hi) chunk ranges: the first chunks (own masks) apart, then slabs of the rest."""
        if self.first:
            yield 0, self.first
        for lo in range(self.first, self.N, self.slab):
            yield lo, min(self.N, lo + self.slab)

    def mask(self, lo: int, hi: int, B: int):
        """Additive float mask for chunks [lo, hi) of B rows: [B*n, 1, C, K] before `first`, else one [C, K]."""
        if lo < self.first:
            return self._mask(lo, hi)[None].expand(B, -1, -1, -1).flatten(0, 1)[:, None]
        if self._shared is None:
            self._shared = self._mask(self.first, self.first + 1)[0]
        return self._shared

    def _mask(self, lo: int, hi: int):
        """[n, C, K] additive masks of chunks lo..hi-1."""
        C, dev = self.C, self.device
        i = torch.arange(lo, hi, device=dev)[:, None, None]
        qpos = i * C + torch.arange(C, device=dev)[None, :, None]                      # [n, C, 1]
        slot = torch.arange(self.K, device=dev)[None, None, :]
        is_sink = slot < self.s
        kpos = torch.where(is_sink, slot, (i - self.n_prev) * C + slot - self.s)         # [n, 1, K]
        seen = _visible(qpos, kpos, self.window, self.s, is_sink)
        return torch.zeros(seen.shape, dtype=self.dtype, device=dev).masked_fill_(~seen, float("-inf"))

    def queries(self, t, lo: int, hi: int):
        """Rows of chunks [lo, hi) of t [B, H, S, D] as [B*n, H, C, D] (a copy)."""
        C = self.C
        return _rows(t, lo * C, hi * C).unflatten(2, (hi - lo, C)).transpose(1, 2).flatten(0, 1).contiguous()

    def keys(self, t, lo: int, hi: int):
        """Keys of chunks [lo, hi): [sinks | n_prev + 1 chunks] of t [B, H, S, D] -> [B*n, H, K, D]."""
        C, n, p = self.C, hi - lo, self.n_prev
        tp = _rows(t, (lo - p) * C, hi * C).unflatten(2, (n + p, C))                  # [B, H, n + p, C, D]
        kb = torch.cat([tp[:, :, j:j + n] for j in range(p + 1)], dim=3)               # [B, H, n, (p+1)C, D]
        if self.s:
            kb = torch.cat([t[:, :, None, :self.s].expand(-1, -1, n, -1, -1), kb], dim=3)
        return kb.transpose(1, 2).flatten(0, 1).contiguous()

    def fold_keys(self, g_band, acc, sink_acc, lo: int, hi: int):
        """Add the gradient of keys(t, lo, hi) [B*n, H, K, D] into acc [B, H, (N + n_prev) C, D]
        (rows shifted by n_prev chunks) and sink_acc [B, H, s, D]."""
        C, n, p, B = self.C, hi - lo, self.n_prev, acc.shape[0]
        g = g_band.unflatten(0, (B, n)).transpose(1, 2)                                 # [B, H, n, K, D]
        if self.s:
            sink_acc += g[:, :, :, :self.s].sum(2)
        g = g[:, :, :, self.s:].unflatten(3, (p + 1, C))                                 # [B, H, n, p+1, C, D]
        acc_c = acc.unflatten(2, (self.N + p, C))
        for j in range(p + 1):
            acc_c[:, :, lo + j:hi + j] += g[:, :, :, j]


class _BandedAttention(torch.autograd.Function):
    """One document through CPU flash attention, slab by slab: saves q, k, v, the output
    and its logsumexp (no band copies); the backward rebuilds each slab's band."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, sinks: int, scale: float):
        B, Hq, S, D = q.shape
        g = _Band(S, window, sinks, q.device, q.dtype)
        # [B, S, Hq, D] memory, returned as a [B, Hq, S, D] view: the caller's transpose back for
        # o_proj is then free, and o_proj saves this same storage rather than a copy of it.
        out = q.new_empty(B, g.N * g.C, Hq, D)
        lse = None
        for lo, hi in g.slabs():
            o, l = _flash(g.queries(q, lo, hi), g.keys(k, lo, hi), g.keys(v, lo, hi), g.mask(lo, hi, B), scale)
            out.unflatten(1, (g.N, g.C))[:, lo:hi] = o.unflatten(0, (B, hi - lo)).permute(0, 1, 3, 2, 4)
            if lse is None:
                lse = l.new_empty(B, g.N, Hq, g.C)
            lse[:, lo:hi] = l.unflatten(0, (B, hi - lo))
        out = out[:, :S].transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.band, ctx.scale = g, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        g, scale = ctx.band, ctx.scale
        B, Hq, S, D = q.shape
        Hkv, C, p = k.shape[1], g.C, g.n_prev
        dq = q.new_empty(B, Hq, g.N * C, D)
        dk, dv = (k.new_zeros(B, Hkv, (g.N + p) * C, D) for _ in range(2))
        dks, dvs = (k.new_zeros(B, Hkv, g.s, D) for _ in range(2))
        for lo, hi in g.slabs():
            n = hi - lo
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g.queries(dout, lo, hi), g.queries(q, lo, hi), g.keys(k, lo, hi), g.keys(v, lo, hi),
                g.queries(out, lo, hi), lse[:, lo:hi].flatten(0, 1), 0.0, False,
                attn_mask=g.mask(lo, hi, B), scale=scale)
            dq.unflatten(2, (g.N, C))[:, :, lo:hi] = gq.unflatten(0, (B, n)).transpose(1, 2)
            g.fold_keys(gk, dk, dks, lo, hi)
            g.fold_keys(gv, dv, dvs, lo, hi)
        dk, dv = dk[:, :, p * C:p * C + S], dv[:, :, p * C:p * C + S]
        if g.s:
            dk[:, :, :g.s] += dks
            dv[:, :, :g.s] += dvs
        return dq[:, :, :S], dk, dv, None, None, None


def _flash(q, k, v, mask, scale):
    """torch's CPU flash attention (GQA native): output and its logsumexp."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                      scale=scale)


def _one_document(q, k, v, window: int, sinks: int, scale: float):
    """Banded attention over one document [B, H, S, D] (no cu_seqlens)."""
    return _BandedAttention.apply(q, k, v, window, sinks, scale)


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
