"""Memory-lean attention in plain PyTorch: the path the model uses without a GPU.

FlashAttention's algorithm written with torch ops: queries are cut into
chunks inside each document; each chunk visits only the key intervals that
can hold visible keys (window, sinks, own and selected MoBA blocks) in pieces
of bounded size, with an online softmax. Backward is a custom autograd
Function that saves only (q, k, v, out, lse) and recomputes each piece, so
neither pass ever holds an [S, S] matrix: peak extra memory is a few
[B, Hq, Cq, Ck] pieces plus fp32 gradient buffers of the size of q/k/v.

Legend: B batch, Hkv kv heads, G = Hq // Hkv, Cq query-chunk rows,
Ck key-piece columns, D head dim, NBd blocks in the current document.
"""
from __future__ import annotations

import torch

from .common import AttnSpec, check_args, moba_select

_Q_CHUNK = 512
_PIECE_BUDGET = 1 << 20  # elements of one [B, Hq, Cq, Ck] score piece (4 MiB fp32)


def _merge(intervals):
    out = []
    for a, b in sorted(iv for iv in intervals if iv[1] > iv[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _key_intervals(spec: AttnSpec, sel_c, q0, q1, start, end):
    """Disjoint absolute key ranges that may be visible to queries [q0, q1) of doc [start, end)."""
    hi = q1 if spec.causal else end
    if spec.full:
        return [(start, hi)]
    iv = []
    if spec.window is not None:
        iv.append((max(start, q0 - spec.window + 1), hi))
    if spec.sink_tokens:
        iv.append((start, min(start + spec.sink_tokens, hi)))
    if spec.moba:
        bs = spec.block_size
        b0, b1 = (q0 - start) // bs, (q1 - 1 - start) // bs
        own_hi = hi if spec.causal else min(end, start + (b1 + 1) * bs)
        iv.append((start + b0 * bs, own_hi))
        for b in torch.unique(sel_c[sel_c >= 0]).tolist():
            iv.append((start + b * bs, min(hi, start + (b + 1) * bs)))
    return _merge(iv)


def _plan(spec: AttnSpec, sel, B: int, Hq: int):
    """Yield (q0, q1, start, selmask, pieces) for every query chunk of every document."""
    cq = _Q_CHUNK if B * Hq <= 16 else 128
    ck = max(128, _PIECE_BUDGET // (B * Hq * cq))
    for start, end in spec.docs():
        for q0 in range(start, end, cq):
            q1 = min(end, q0 + cq)
            sel_c, selmask = None, None
            if spec.moba:
                sel_c = sel[:, :, q0:q1].long()  # [B, Hq, Cq, K]
                nbd = -(-(end - start) // spec.block_size)
                idx = torch.where(sel_c < 0, nbd, sel_c)
                selmask = torch.zeros(*sel_c.shape[:3], nbd + 1, dtype=torch.bool,
                                      device=sel.device)
                selmask = selmask.scatter_(-1, idx, True)[..., :nbd]  # [B, Hq, Cq, NBd]
            intervals = _key_intervals(spec, sel_c, q0, q1, start, end)
            pieces = [(a, min(b, a + ck)) for lo, b in intervals for a in range(lo, b, ck)]
            yield q0, q1, start, selmask, pieces


def _piece_mask(spec: AttnSpec, q0, q1, k0, k1, start, selmask, Hkv: int, dev):
    """Visibility for queries [q0, q1) x keys [k0, k1): bool [B|1, Hkv|1, G|1, Cq, Ck]."""
    i = torch.arange(q0 - start, q1 - start, device=dev)[:, None]
    j = torch.arange(k0 - start, k1 - start, device=dev)[None, :]
    mask = j <= i if spec.causal else torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=dev)
    if spec.full:
        return mask
    vis = torch.zeros_like(mask)
    if spec.window is not None:
        vis |= j > i - spec.window
    if spec.sink_tokens:
        vis = vis | (j < spec.sink_tokens)
    if spec.moba:
        bi, bj = i // spec.block_size, j // spec.block_size
        vis = vis | (bi == bj) | selmask[..., bj[0]]  # [B, Hq, Cq, Ck]
        vis = vis.unflatten(1, (Hkv, -1))
    return mask & vis


def _scores(qc, kp, spec: AttnSpec, q0, q1, k0, k1, start, selmask):
    """Scaled scores [B, Hkv, G, Cq, Ck] of one piece, -inf where not visible."""
    s = (qc @ kp.transpose(-1, -2)) * spec.scale
    mask = _piece_mask(spec, q0, q1, k0, k1, start, selmask, kp.shape[1], qc.device)
    return s.masked_fill(~mask, float("-inf"))


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sel, spec):
        out, lse = _forward(q, k, v, sel, spec)
        ctx.save_for_backward(q, k, v, out, lse, sel)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sel = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, sel, ctx.spec)
        return dq, dk, dv, None, None


def _compute_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def _forward(q, k, v, sel, spec: AttnSpec):
    """out [B, Hq, S, D] in q's dtype and lse [B, Hq, S] (natural log, +inf for empty rows)."""
    B, Hq, S, D = q.shape
    Hkv, ct = k.shape[1], _compute_dtype(q)
    out = torch.zeros(B, Hkv, Hq // Hkv, S, D, dtype=ct, device=q.device)
    lse = torch.full((B, Hkv, Hq // Hkv, S), float("inf"), dtype=ct, device=q.device)
    qg = q.unflatten(1, (Hkv, -1))
    for q0, q1, start, selmask, pieces in _plan(spec, sel, B, Hq):
        qc = qg[:, :, :, q0:q1].to(ct)  # [B, Hkv, G, Cq, D]
        m = torch.full(qc.shape[:-1], float("-inf"), dtype=ct, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(qc)
        for k0, k1 in pieces:
            kp, vp = k[:, :, None, k0:k1].to(ct), v[:, :, None, k0:k1].to(ct)  # [B, Hkv, 1, Ck, D]
            s = _scores(qc, kp, spec, q0, q1, k0, k1, start, selmask)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing visible yet
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vp
            m = m_new
        seen = l > 0
        out[:, :, :, q0:q1] = acc / torch.where(seen, l, 1.0)[..., None]
        lse[:, :, :, q0:q1] = torch.where(seen, m + torch.log(l), float("inf"))
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def _backward(dout, q, k, v, out, lse, sel, spec: AttnSpec):
    """FlashAttention-2 backward by recomputation: dq, dk, dv (in the inputs' dtypes)."""
    B, Hq, S, D = q.shape
    Hkv, ct = k.shape[1], _compute_dtype(q)
    delta = (dout.to(ct) * out.to(ct)).sum(-1).unflatten(1, (Hkv, -1))  # [B, Hkv, G, S]
    dq = torch.zeros(B, Hkv, Hq // Hkv, S, D, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)
    dv = torch.zeros_like(dk)
    qg, dog, lseg = (t.unflatten(1, (Hkv, -1)) for t in (q, dout, lse))
    for q0, q1, start, selmask, pieces in _plan(spec, sel, B, Hq):
        qc, doc = qg[:, :, :, q0:q1].to(ct), dog[:, :, :, q0:q1].to(ct)  # [B, Hkv, G, Cq, D]
        lse_c, delta_c = lseg[:, :, :, q0:q1, None], delta[:, :, :, q0:q1, None]
        for k0, k1 in pieces:
            kp, vp = k[:, :, None, k0:k1].to(ct), v[:, :, None, k0:k1].to(ct)
            s = _scores(qc, kp, spec, q0, q1, k0, k1, start, selmask)
            p = torch.exp(s - lse_c)  # [B, Hkv, G, Cq, Ck]; 0 where masked or row empty
            dv[:, :, k0:k1] += (p.transpose(-1, -2) @ doc).sum(2)
            ds = p * (doc @ vp.transpose(-1, -2) - delta_c)
            dq[:, :, :, q0:q1] += (ds @ kp) * spec.scale
            dk[:, :, k0:k1] += (ds.transpose(-1, -2) @ qc).sum(2) * spec.scale
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def sparse_attention(q, k, v, *, causal=True, window=None, sink_tokens=0, block_size=64,
                     moba_topk=None, cu_seqlens=None, scale=None):
    """Chunked attention, same contract as `reference.sparse_attention`, O(S) memory."""
    spec = check_args(q, k, v, causal=causal, window=window, sink_tokens=sink_tokens,
                      block_size=block_size, moba_topk=moba_topk, cu_seqlens=cu_seqlens,
                      scale=scale)
    sel = moba_select(q, k, spec) if spec.moba else q.new_empty(0, dtype=torch.int32)
    return _ChunkedAttention.apply(q, k, v, sel, spec)
