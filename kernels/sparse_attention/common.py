"""Argument checks, document layout and MoBA block selection shared by every path.

The reference, the chunked CPU path and the Triton kernels all call
`check_args` and `moba_select`, so they agree on the mask by construction:
the selection is computed once, in torch, outside autograd.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv (query
heads per kv head; query head h reads kv head h // G), S sequence, D head
dim, NB blocks over all documents, K = moba_topk - 1 selected earlier blocks.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

# Query rows scored per step in `moba_select` are sized so the score tensor
# [B, Hq, rows, NB] stays around this many elements (64 MiB in fp32).
_SELECT_BUDGET = 1 << 24


@dataclass(frozen=True)
class AttnSpec:
    """Validated attention options; positions in `cu` are absolute token indices."""

    causal: bool
    window: int | None
    sink_tokens: int
    block_size: int
    moba_topk: int | None
    scale: float
    cu: tuple[int, ...]  # document boundaries, (0, S) when not packed

    @property
    def full(self) -> bool:
        """No sparse mode: every (causal, same-document) key is visible."""
        return self.window is None and self.sink_tokens == 0 and self.moba_topk is None

    @property
    def moba(self) -> bool:
        return self.moba_topk is not None

    @property
    def n_docs(self) -> int:
        return len(self.cu) - 1

    def docs(self):
        """(start, end) of each non-empty document."""
        return [(a, b) for a, b in zip(self.cu[:-1], self.cu[1:]) if b > a]


def _as_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_tensors(q, k, v, dtypes) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D], got {shape}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {sorted(map(str, dtypes))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    (B, Hq, S, D), (Bk, Hkv, Sk, Dk) = q.shape, k.shape
    if (B, S, D) != (Bk, Sk, Dk):
        raise ValueError(
            f"q [B, Hq, S, D] = {tuple(q.shape)} and k/v [B, Hkv, S, D] = {tuple(k.shape)} "
            "must agree on B, S and D")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if S == 0 or D == 0:
        raise ValueError(f"sequence length and head dim must be >= 1, got S={S}, D={D}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def _check_cu(cu_seqlens, B: int, S: int) -> tuple[int, ...]:
    if cu_seqlens is None:
        return (0, S)
    if B != 1:
        raise ValueError("cu_seqlens packs documents along one row, so it requires B == 1 "
                         f"(got B={B})")
    if not isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = torch.as_tensor(cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [n_docs+1], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    cu = tuple(int(x) for x in cu_seqlens.tolist())
    if cu[0] != 0 or cu[-1] != S or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, end at S={S} and never decrease, "
                         f"got {list(cu)}")
    return cu


_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_args(q, k, v, *, causal, window, sink_tokens, block_size, moba_topk, cu_seqlens,
               scale, dtypes=_ALL_DTYPES) -> AttnSpec:
    """Validate user arguments (ValueError with the reason) and normalise them."""
    _check_tensors(q, k, v, dtypes)
    window = None if window is None else _as_int("window", window, 1)
    moba_topk = None if moba_topk is None else _as_int("moba_topk", moba_topk, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return AttnSpec(
        causal=bool(causal), window=window,
        sink_tokens=_as_int("sink_tokens", sink_tokens, 0),
        block_size=_as_int("block_size", block_size, 1),
        moba_topk=moba_topk, scale=scale,
        cu=_check_cu(cu_seqlens, q.shape[0], q.shape[2]))


def doc_positions(spec: AttnSpec, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_id [S] and position inside the document [S] (int64) of every token."""
    cu = torch.tensor(spec.cu, device=device, dtype=torch.int64)
    idx = torch.arange(S, device=device)
    doc = torch.searchsorted(cu[1:], idx, right=True)
    return doc, idx - cu[doc]


def _block_table(spec: AttnSpec, S: int, device):
    """Global id of every token's block [S], plus doc [NB] and in-doc index [NB] per block."""
    bs = spec.block_size
    doc, pos = doc_positions(spec, S, device)
    lens = [b - a for a, b in zip(spec.cu[:-1], spec.cu[1:])]
    n_blk = torch.tensor([-(-n // bs) for n in lens], device=device)
    first = torch.cumsum(n_blk, 0) - n_blk  # global id of each document's block 0
    tok_gid = first[doc] + pos // bs
    blk_doc = torch.repeat_interleave(torch.arange(len(lens), device=device), n_blk)
    blk_rel = torch.arange(int(n_blk.sum()), device=device) - first[blk_doc]
    return tok_gid, blk_doc, blk_rel, doc, pos // bs


@torch.no_grad()
def moba_select(q: torch.Tensor, k: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """Earlier blocks each query attends to besides its own: int32 [B, Hq, S, K].

    Entries are block indices inside the query's document, best first, -1
    where the document has fewer than K earlier blocks. A block is eligible
    when it ends before the query's own block starts; its score is
    q_i . mean(k over the block) per head, ties go to the lower index
    (stable sort). Computed in >= fp32 and never differentiated.
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    K = spec.moba_topk - 1
    sel = torch.full((B, Hq, S, K), -1, dtype=torch.int32, device=q.device)
    if K == 0:
        return sel
    ct = torch.promote_types(q.dtype, torch.float32)
    tok_gid, blk_doc, blk_rel, doc, qblk = _block_table(spec, S, q.device)
    NB = blk_doc.numel()
    ksum = torch.zeros(B, Hkv, NB, D, dtype=ct, device=q.device).index_add_(2, tok_gid, k.to(ct))
    kmean = ksum / torch.bincount(tok_gid, minlength=NB).to(ct)[:, None]
    qg = q.view(B, Hkv, Hq // Hkv, S, D)
    rows = max(1, _SELECT_BUDGET // max(1, B * Hq * NB))
    for r0 in range(0, S, rows):
        r1 = min(S, r0 + rows)
        scores = torch.einsum("bhgcd,bhnd->bhgcn", qg[:, :, :, r0:r1].to(ct), kmean)
        ok = (blk_doc[None, :] == doc[r0:r1, None]) & (blk_rel[None, :] < qblk[r0:r1, None])
        scores.masked_fill_(~ok, float("-inf"))
        order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :K]
        best = torch.where(ok.expand_as(scores).gather(-1, order), blk_rel[order], -1)
        sel[:, :, r0:r1, : best.shape[-1]] = best.reshape(B, Hq, r1 - r0, -1).to(torch.int32)
    return sel
