"""Loss by position: mean next-token loss per position bucket on held-out documents.

Windows of S + 1 tokens are cut from the eval split of a prepared folder (the
documents the training loader never reads), each from the start of a document
and then further along, round-robin over the documents long enough, so a few
long books give as many windows as asked. Position p's loss is the loss of
predicting token p + 1 from tokens 0..p; buckets are equal slices of [0, S).
A model that uses its context shows a falling curve; one that breaks past its
trained length shows the curve turning up there.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moetrain.data.shards import SplitData


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


@torch.no_grad()
def position_losses(forward, windows: np.ndarray, batch_tokens: int = 8192) -> np.ndarray:
    """Mean loss at each position [S] over the windows."""
    tokens = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    S = tokens.shape[1] - 1
    per_batch = max(1, batch_tokens // S)
    total = torch.zeros(S, dtype=torch.float64)
    for b in range(0, len(tokens), per_batch):
        chunk = tokens[b:b + per_batch]
        logits = forward(chunk[:, :-1])
        loss_BS = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")
        total += loss_BS.double().sum(0)
    return (total / len(tokens)).numpy()


def loss_by_position(forward, data_dir: str, length: int, windows: int, buckets: int,
                     batch_tokens: int = 8192) -> dict:
    """The curve at one context length; raises ValueError when no held-out document fits."""
    toks = held_out_windows(data_dir, length, windows)
    if len(toks) == 0:
        raise ValueError(f"no held-out document in '{data_dir}' has {length + 1} tokens")
    pos = position_losses(forward, toks, batch_tokens)
    bounds = bucket_bounds(length, buckets)
    return {"windows": int(len(toks)), "bucket_start": [a for a, _ in bounds], "bucket_end": [b for _, b in bounds],
            "loss": [float(pos[a:b].mean()) for a, b in bounds], "mean": float(pos.mean())}
