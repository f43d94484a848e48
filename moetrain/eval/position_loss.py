"""Loss by position: mean next-token loss per position bucket on held-out documents.

Windows of S + 1 tokens are cut from the eval split of a prepared folder (the
documents the training loader never reads), each from the start of a document
and then further along, round-robin over the documents long enough, so a few
long books give as many windows as asked. Position p's loss is the loss of
predicting token p + 1 from tokens 0..p; buckets are equal slices of [0, S).
A model that uses its context shows a falling curve; one that breaks past its
trained length shows the curve turning up there.

Only bucket sums are computed: the hidden states go through the model's chunked
cross-entropy bucket by bucket (`bucket_loss_head`), so no [B, S, V] logits exist.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from moetrain.data.shards import SplitData
from moetrain.eval.loading import run_head
from moetrain.eval.passkey import my_rounds, sum_over_ranks
from moetrain.model.loss import chunked_cross_entropy

LOSS_CHUNK = 4096        # tokens per [chunk, V] block of logits
ROWS_PER_CALL = 16384    # tokens per cross-entropy call (each gets an fp32 copy of its hidden states)


def held_out_windows(data_dir: str, length: int, n: int, split: str = "eval") -> np.ndarray:
    """[m, length + 1] int64 token windows, m <= n (0 when no document is long enough)."""
    data = SplitData(data_dir, split, verify_hashes=False)
    need = length + 1
    docs = [d for d in np.argsort(-data.lengths, kind="stable") if data.lengths[d] >= need]
    windows, k = [], 0
    while docs and len(windows) < n:
        for d in docs:
            if len(windows) == n:
                break
            if (k + 1) * need <= data.lengths[d]:
                windows.append(data.tokens(int(d), k * need, (k + 1) * need))
        docs = [d for d in docs if (k + 2) * need <= data.lengths[d]]
        k += 1
    return np.stack(windows) if windows else np.zeros((0, need), dtype=np.int64)


def bucket_bounds(length: int, buckets: int) -> list:
    """[(start, end)] of `buckets` near-equal slices of positions [0, length)."""
    edges = np.linspace(0, length, min(buckets, length) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def bucket_loss_head(labels_BS: torch.Tensor, bounds: list, chunk: int | None = None) -> Callable:
    """A head: float64 [n_buckets] summed next-token losses of the positions in each bucket that
    lie in this rank's shard. Logits exist one [chunk, V] block at a time (the model's chunked
    cross-entropy, moetrain/model/loss.py), never for the whole sequence."""
    chunk = chunk or LOSS_CHUNK

    def head(h, w, start):
        out = torch.zeros(len(bounds), dtype=torch.float64, device=h.device)
        w32 = None if w is None else w.float()
        step = max(1, ROWS_PER_CALL // h.shape[0])  # positions per call: bounds the fp32 copy of h
        for j, (a, b) in enumerate(bounds):
            for s in range(max(a, start), min(b, start + h.shape[1]), step):
                e = min(b, start + h.shape[1], s + step)
                x = h[:, s - start:e - start].reshape(-1, h.shape[-1]).float()
                y = labels_BS[:, s:e].reshape(-1).to(h.device)
                if w32 is None:  # a logits callable: x already are logits
                    out[j] += F.cross_entropy(x, y, reduction="sum").double()
                else:
                    out[j] += chunked_cross_entropy(x, w32, y, chunk, reduction="sum").double()
        return out
    return head


@torch.no_grad()
def bucket_losses(forward, windows: np.ndarray, bounds: list, batch_tokens: int = 8192) -> np.ndarray:
    """Mean loss per position bucket [n_buckets] over the windows [n, S + 1]. The windows'
    batches are split over the data-parallel ranks; per-batch sums are added in batch order,
    so every rank gets the same numbers."""
    tokens = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    S = tokens.shape[1] - 1
    per_batch = max(1, batch_tokens // S)
    starts = list(range(0, len(tokens), per_batch))
    sums = torch.zeros(len(starts), len(bounds), dtype=torch.float64)
    for k in my_rounds(len(starts), forward):
        chunk = tokens[starts[k if k is not None else 0]:][:per_batch]
        part = run_head(forward, chunk[:, :-1], bucket_loss_head(chunk[:, 1:], bounds)).cpu()
        if k is not None:
            sums[k] = part
    sizes = torch.tensor([float(b - a) for a, b in bounds], dtype=torch.float64)
    return (sum_over_ranks(sums, forward).sum(0) / (len(tokens) * sizes)).numpy()


def loss_by_position(forward, data_dir: str, length: int, windows: int, buckets: int,
                     batch_tokens: int = 8192) -> dict:
    """The curve at one context length; raises ValueError when no held-out document fits."""
    toks = held_out_windows(data_dir, length, windows)
    if len(toks) == 0:
        raise ValueError(f"no held-out document in '{data_dir}' has {length + 1} tokens")
    bounds = bucket_bounds(length, buckets)
    loss = bucket_losses(forward, toks, bounds, batch_tokens)
    sizes = np.array([b - a for a, b in bounds], dtype=np.float64)
    return {"windows": int(len(toks)), "bucket_start": [a for a, _ in bounds], "bucket_end": [b for _, b in bounds],
            "loss": [float(x) for x in loss], "mean": float((loss * sizes).sum() / sizes.sum())}
