"""Training FLOPs that count the attention the pattern actually computes: the MFU in
metrics.jsonl (moetrain/train/collector.py) and `train.py --dry-run` both use these.

Legend: S sequence, n document length, i a query's position inside its document,
W window, s sink tokens, b MoBA block size, k MoBA top-k, Hq query heads, D head dim.

Dense part: 6 x active non-embedding parameters per token (2 forward, 4 backward; the
LM head counts, the embedding lookup does not). Attention part: per visible (query,
key) pair and query head, q.k and p.v cost 2*D FLOPs each, so 4*D forward and 12*D
forward + backward (backward = 2 x forward, the convention 6N also follows; recomputed
activations are not counted: this is MFU, not HFU). Full causal attention over S is
S(S+1)/2 pairs, i.e. ~6*L*S*Hq*D per token, the PaLM figure the code used before.

Which keys a query sees depends only on i (DESIGN.md section 2, the kernel's semantics):
  full     i + 1
  sliding  min(i + 1, W), plus the sinks below the window: min(s, max(0, i - W + 1))
  moba     its own block up to i: (i mod b) + 1, plus min(i // b, k - 1) whole earlier
           blocks, plus sinks outside them: min(s, (i // b - k + 1) * b) once some earlier
           block went unselected (an upper bound: the selection is data-dependent, and
           when block 0 is among the selected the sinks cost nothing extra)
Summed over the layers (each with its kind) this is `keys_per_query`; a document of n
tokens costs its cumulative sum up to n, and a batch costs the sum over its tokens of
keys_per_query[position in document]: documents (doc masking) come in through the
position ids, which restart at 0 in each packed document.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from moetrain.config import AttentionConfig, ModelConfig, head_dim

TRAIN_FLOPS_PER_PAIR_PER_DIM = 12   # x Hq x D per visible pair: 4 forward + 8 backward


def _capped_sum(x: np.ndarray, cap: int) -> np.ndarray:
    """sum_{m=1..x} min(m, cap) for each x >= 0."""
    x = np.maximum(x, 0).astype(np.float64)
    lo = np.minimum(x, cap)
    return lo * (lo + 1) / 2 + (x - lo) * cap


def layer_keys(kind: str, attn: AttentionConfig, length: int) -> np.ndarray:
    """[length] keys each query position i (inside its document) attends to, one layer."""
    from moetrain.model.attention import kernel_kwargs
    kw = kernel_kwargs(attn, kind)
    i = np.arange(length, dtype=np.float64)
    s = kw["sink_tokens"]
    if kw["window"] is not None:
        W = kw["window"]
        return np.minimum(i + 1, W) + np.minimum(s, np.maximum(0, i - W + 1))
    if kw["moba_topk"] is not None:
        b, k = kw["block_size"], kw["moba_topk"]
        blk = np.floor_divide(i, b)
        unselected = np.maximum(0, blk - (k - 1)) * b  # keys of earlier blocks not chosen
        return (i - blk * b + 1) + np.minimum(blk, k - 1) * b + np.minimum(s, unselected)
    return i + 1


def keys_per_query(model: ModelConfig, length: int, attn: Optional[AttentionConfig] = None) -> np.ndarray:
    """[length] visible keys of a query at document position i, summed over all layers."""
    from moetrain.model.attention import layer_kind
    attn = attn or model.attention
    kinds = [layer_kind(attn, li, model.n_layers) for li in range(model.n_layers)]
    return sum(layer_keys(kind, attn, length) * kinds.count(kind) for kind in sorted(set(kinds)))


def attention_pairs(model: ModelConfig, doc_lens: Iterable[int], attn: Optional[AttentionConfig] = None) -> float:
    """Visible (query, key) pairs of documents of these lengths, summed over layers (per head)."""
    doc_lens = [int(n) for n in doc_lens]
    if not doc_lens:
        return 0.0
    table = np.concatenate([[0.0], np.cumsum(keys_per_query(model, max(doc_lens), attn))])
    return float(sum(table[n] for n in doc_lens))


def causal_pairs(model: ModelConfig, doc_lens: Iterable[int]) -> float:
    """The same with full causal attention in every layer (what the old estimate charged)."""
    return float(sum(n * (n + 1) / 2 for n in doc_lens)) * model.n_layers


def attention_flops(model: ModelConfig, pairs) -> float:
    """Training FLOPs (forward + backward) of `pairs` layer-summed visible pairs, all heads."""
    return TRAIN_FLOPS_PER_PAIR_PER_DIM * model.n_heads * head_dim(model) * pairs


def dense_flops_per_token(model: ModelConfig, counts: dict) -> float:
    """6 x active parameters without the embedding table (a tied LM head still counts)."""
    active = counts["active"] - counts["embedding"]
    if model.tie_embeddings:
        active += counts["embedding"]  # the same matrix is the LM head's matmul
    return 6.0 * active


def train_flops_per_token(model: ModelConfig, counts: dict, seq_len: int, doc_len: Optional[int] = None,
                          attn: Optional[AttentionConfig] = None) -> float:
    """Mean training FLOPs per token of sequences of `seq_len` tokens cut into documents of
    `doc_len` tokens (None: one document per sequence, i.e. window mode or no doc masking)."""
    doc_len = min(doc_len or seq_len, seq_len)
    docs = [doc_len] * (seq_len // doc_len) + ([seq_len % doc_len] if seq_len % doc_len else [])
    return dense_flops_per_token(model, counts) + attention_flops(model, attention_pairs(model, docs, attn)) / seq_len


class PairCounter:
    """Visible attention pairs of the training forwards, accumulated on the device without a
    host sync: a forward pre-hook on the plain model adds keys_per_query[position_ids] of
    every training micro-batch (position ids restart in each packed document, so document
    masks count). Under sequence parallelism each rank adds its own tokens' queries."""

    def __init__(self):
        self.total: Optional[torch.Tensor] = None
        self._table: Optional[torch.Tensor] = None
        self._key = None
        self.pattern = None   # (model cfg, attention cfg, seq_len) of the current stage

    def set_stage(self, model: ModelConfig, attn: AttentionConfig, seq_len: int) -> None:
        self.pattern = (model, attn, seq_len)

    def attach(self, module: torch.nn.Module):
        return module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _table_on(self, device) -> torch.Tensor:
        key = (id(self.pattern[1]), self.pattern[2], str(device))
        if key != self._key:
            model, attn, seq_len = self.pattern
            self._table = torch.from_numpy(keys_per_query(model, seq_len, attn)).to(device)
            self._key = key
        return self._table

    def _hook(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()) or self.pattern is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("position_ids")
        if pos is None:  # the model's own default: global positions of this rank's sequence shard
            start = getattr(getattr(module, "seq_shard", None), "rank", 0) * ids.shape[-1]
            pos = torch.arange(start, start + ids.shape[-1], device=ids.device).expand(ids.shape)
        table = self._table_on(pos.device)
        pairs = table[pos.reshape(-1).clamp(max=table.numel() - 1)].sum()
        self.total = pairs if self.total is None else self.total + pairs
        return None

    def take(self, device) -> torch.Tensor:
        """Pairs since the last take (float64, on `device`), and reset."""
        t = self.total if self.total is not None else torch.zeros((), dtype=torch.float64, device=device)
        self.total = None
        return t.to(device=device, dtype=torch.float64)
