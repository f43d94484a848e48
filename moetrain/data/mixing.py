"""Length-aware mixing and epoch plans.

Mixing (Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K
Context"): documents longer than L tokens are upsampled by f *within* their
source, then each source is rescaled so the source mixture is kept (natural
proportions, or the configured weights). Each document d gets a real-valued
multiplicity c_d; an epoch holds floor(c_d) full copies of d plus one
contiguous slice of frac(c_d) of its tokens. Slicing (rather than drawing
whole copies at random) makes every epoch hit the expected token shares
exactly, not just on average.

An epoch plan lays the copies out in a seeded random order and cuts them into
rows of S+1 tokens (S inputs + the last target), in one of two ways:
  packed:  copies concatenated into one stream, cut every S tokens; a row may
           hold pieces of several documents (the loader marks the boundaries).
  window:  S+1-token windows inside single copies (shorter copies give none),
           at a random offset per copy.
Rows are then shuffled. Everything derives from (seed, epoch): no state.
"""
from __future__ import annotations

import numpy as np

from .errors import DataError

_PLAN_TAG = 0x91A7  # separates the plan's random stream from the loader's others


def doc_multipliers(lengths: np.ndarray, doc_source: np.ndarray, source_names: list[str], weights: dict,
                    min_len: int, factor: float) -> np.ndarray:
    """Copies per epoch of each document (real-valued); see the module docstring."""
    lengths = np.asarray(lengths, dtype=np.float64)
    up = np.where((min_len > 0) & (lengths > min_len), float(factor), 1.0)
    n_src = len(source_names)
    upsampled = np.bincount(doc_source, weights=lengths * up, minlength=n_src)
    natural = np.bincount(doc_source, weights=lengths, minlength=n_src)
    if weights:
        unknown = sorted(set(weights) - set(source_names))
        if unknown:
            raise DataError(f"data.source_weights names unknown source '{unknown[0]}'; sources are: "
                            f"{', '.join(source_names)}")
        present = [n for i, n in enumerate(source_names) if natural[i] > 0]
        missing = [n for n in present if n not in weights]
        if missing:
            raise DataError(f"data.source_weights must give every source a weight; missing '{missing[0]}' "
                            f"(sources: {', '.join(present)})")
        share = np.array([float(weights.get(n, 0.0)) for n in source_names])
        if (share < 0).any() or share.sum() <= 0:
            raise DataError("data.source_weights must be >= 0 and not all 0")
        empty = [n for i, n in enumerate(source_names) if share[i] > 0 and natural[i] == 0]
        if empty:
            raise DataError(f"data.source_weights gives weight to '{empty[0]}', which has no documents here")
    else:
        share = natural  # Fu et al.: keep the original source mixture
    share = share / share.sum()
    epoch_tokens = upsampled.sum()
    per_source = np.divide(share * epoch_tokens, upsampled, out=np.zeros(n_src), where=upsampled > 0)
    return per_source[doc_source] * up


def expected_share(lengths, mult, mask) -> float:
    """Token share of the documents in `mask` under multiplicities `mult` (what the loader should hit)."""
    w = np.asarray(lengths, dtype=np.float64) * mult
    return float(w[mask].sum() / w.sum())


def _copies(lengths: np.ndarray, mult: np.ndarray, rng: np.random.Generator):
    """(doc, start, length) of this epoch's copies, shuffled."""
    full = np.floor(mult + 1e-9).astype(np.int64)
    part_len = np.round((mult - full).clip(0) * lengths).astype(np.int64)
    part_start = (rng.random(len(lengths)) * (lengths - part_len + 1)).astype(np.int64)
    doc = np.repeat(np.arange(len(lengths)), full)
    start = np.zeros(len(doc), dtype=np.int64)
    has = np.nonzero(part_len > 0)[0]
    doc = np.concatenate([doc, has])
    start = np.concatenate([start, part_start[has]])
    length = np.concatenate([lengths[doc[:len(doc) - len(has)]], part_len[has]])
    order = rng.permutation(len(doc))
    return doc[order], start[order], length[order]


class EpochPlan:
    """Rows of one epoch; row(i) -> [(doc, start, length, segment)] covering seq_len + 1 tokens."""

    def __init__(self, lengths: np.ndarray, mult: np.ndarray, seq_len: int, mode: str, seed: int, epoch: int):
        rng = np.random.default_rng([seed, epoch, _PLAN_TAG])
        self.seq_len, self.mode = seq_len, mode
        self.doc, self.start, self.length = _copies(np.asarray(lengths, dtype=np.int64), mult, rng)
        if mode == "packed":
            self.cum = np.concatenate([[0], np.cumsum(self.length)])
            n_rows = max(0, int(self.cum[-1] - 1) // seq_len)
        else:
            n_win = np.where(self.length > seq_len, (self.length - 1) // seq_len, 0)
            room = np.where(n_win > 0, (self.length - 1) - n_win * seq_len, 0)
            self.offset = (rng.random(len(self.length)) * (room + 1)).astype(np.int64)
            self.win_cum = np.concatenate([[0], np.cumsum(n_win)])
            n_rows = int(self.win_cum[-1])
        self.perm = rng.permutation(n_rows)
        self.rows = n_rows

    def row(self, i: int) -> list[tuple[int, int, int, int]]:
        p = int(self.perm[i])
        S = self.seq_len
        if self.mode == "window":
            k = int(np.searchsorted(self.win_cum, p, side="right")) - 1
            lo = int(self.start[k] + self.offset[k] + (p - self.win_cum[k]) * S)
            return [(int(self.doc[k]), lo, S + 1, k)]
        lo, hi = p * S, p * S + S + 1
        k = int(np.searchsorted(self.cum, lo, side="right")) - 1
        pieces = []
        while lo < hi:
            take = min(hi, int(self.cum[k + 1])) - lo
            pieces.append((int(self.doc[k]), int(self.start[k] + lo - self.cum[k]), take, k))
            lo += take
            k += 1
        return pieces
