"""Pure-PyTorch reference: dense [S, S] masks, plain softmax, autograd for gradients.

It is the definition the other paths are tested against, so it favours
obviousness over memory: fine for test sizes, not for long sequences (use
`chunked.py` there). Computes in fp32 (fp64 for fp64 inputs), returns q's dtype.

Legend: B batch, Hq/Hkv query/kv heads, G = Hq // Hkv, S sequence, D head dim,
K = moba_topk - 1.
"""
from __future__ import annotations

import torch

from .common import AttnSpec, check_args, doc_positions, moba_select


def dense_mask(spec: AttnSpec, S: int, sel: torch.Tensor | None, device) -> torch.Tensor:
    """Visibility of key j for query i: bool [B or 1, Hq or 1, S, S] (DESIGN, section 2)."""
    doc, pos = doc_positions(spec, S, device)
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    mask = doc[:, None] == doc[None, :]
    if spec.causal:
        mask &= j <= i
    if spec.full:
        return mask[None, None]
    vis = torch.zeros(S, S, dtype=torch.bool, device=device)
    if spec.window is not None:
        vis |= j > i - spec.window
    if spec.sink_tokens:
        vis |= pos[None, :] < spec.sink_tokens
    vis = vis[None, None]
    if spec.moba:
        blk = pos // spec.block_size
        vis = vis | (blk[:, None] == blk[None, :])  # own block
        # [B, Hq, S, K, 1] == [S] -> any over K: key j's block was selected by query i
        vis = vis | (sel.long()[..., None] == blk).any(-2)
    return mask[None, None] & vis


def sparse_attention(q, k, v, *, causal=True, window=None, sink_tokens=0, block_size=64,
                     moba_topk=None, cu_seqlens=None, scale=None):
    """Reference attention; q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D].

    Rows without any visible key (impossible when causal) return zeros.
    """
    spec = check_args(q, k, v, causal=causal, window=window, sink_tokens=sink_tokens,
                      block_size=block_size, moba_topk=moba_topk, cu_seqlens=cu_seqlens,
                      scale=scale)
    S, G = q.shape[2], q.shape[1] // k.shape[1]
    sel = moba_select(q, k, spec) if spec.moba else None
    mask = dense_mask(spec, S, sel, q.device)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(ct)
    kf = k.to(ct).repeat_interleave(G, dim=1)
    vf = v.to(ct).repeat_interleave(G, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * spec.scale  # [B, Hq, S, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return (probs @ vf).to(q.dtype)
