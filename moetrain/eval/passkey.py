"""Passkey retrieval on a (context length x depth) grid, scored by greedy decoding.

A trial is correct when greedily decoding the answer's token count after the
prompt gives text whose leading digits (after whitespace) equal the key exactly;
decoding stops early at a non-digit after the number, or as soon as the digits
can no longer become the key (which does not change the verdict).

Decoding token by token costs one forward per answer token. Instead, one
teacher-forced forward over prompt + answer[:-1] yields every greedy step at
once for as long as greedy agrees with the answer; only rows that leave that
path are decoded further, and those nearly always end at once (a wrong digit
cannot become right). The result is the same as plain greedy decoding.

Prompts come from moetrain.data.synthetic (the training format), seeded per
(length, depth) cell, so every model and stage sees the very same trials.
Each trial (prompt and answer) fits in the cell's context length.

Logits come only for the answer positions (`logits_at`): one [B, K, V] block with K the
answer's token count, never [B, S, V] (moetrain/eval/loading.py: run_head). The grid's
batches are split over the data-parallel ranks (each sequence-parallel group takes its
share together) and the correct counts are summed over the ranks, so every rank ends
with the full grid, the same as one process computes it: the batches are formed the
same way whatever the world size, and each is scored alone.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from moetrain.data.synthetic import passkey_sample
from moetrain.eval.loading import eval_layout, run_head

_LEADING_DIGITS = re.compile(r"\d*")


def make_trials(tokenizer, length: int, depth: float, n: int, seed: int, key_digits: int = 5) -> list:
    """n passkey Samples whose prompt + answer fit in `length` tokens."""
    rng = np.random.default_rng([seed, length, round(depth * 1000)])
    reserve = key_digits + 2  # answer pieces plus a possible leading-space piece
    return [passkey_sample(tokenizer, length - reserve, depth, rng, key_digits) for _ in range(n)]


def verdict(text: str, answer: str, n_generated: int, max_new: int):
    """True/False once decided, None while greedy decoding must go on."""
    s = text.lstrip()
    digits = _LEADING_DIGITS.match(s).group()
    if digits and len(digits) < len(s):
        return digits == answer          # a non-digit ended the number
    if s and not digits:
        return False                     # text that is not a number
    if not answer.startswith(digits):
        return False
    if n_generated >= max_new:
        return digits == answer
    return None


def _pad_batch(seqs: list, pad_id: int) -> torch.Tensor:
    """Right padding: with causal attention the pads never affect earlier positions."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def logits_at(index_BK: torch.Tensor) -> Callable:
    """A head: float32 logits [B, K, V] at positions index [B, K] only (zeros for positions
    outside this rank's sequence shard)."""
    def head(h, w, start):
        local = index_BK.to(h.device) - start
        inside = (local >= 0) & (local < h.shape[1])
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        sel_BKd = h[rows, local.clamp(0, h.shape[1] - 1)].float()
        logits = sel_BKd if w is None else sel_BKd @ w.float().t()
        return logits * inside[..., None]
    return head


def _greedy(forward, seqs: list, starts: list, n: int, pad_id: int) -> list:
    """Greedy tokens [row][t] predicted at positions starts[row] + t, t < n (one forward)."""
    index = torch.tensor([[min(st + t, len(sq) - 1) for t in range(n)] for sq, st in zip(seqs, starts)])
    return run_head(forward, _pad_batch(seqs, pad_id), logits_at(index)).argmax(-1).cpu().tolist()


def _open_anywhere(n_open: int) -> bool:
    """Whether any data-parallel rank still decodes: forwards are collective under ZeRO-3."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n_open > 0
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([n_open], dtype=torch.long, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def score_batch(forward, samples: list, tokenizer) -> list:
    """Greedy-decoding exact match for each Sample (one teacher-forced forward, then
    token-by-token only for rows that left the answer's path)."""
    seqs = [s.prompt_ids + s.answer_ids[:-1] for s in samples]
    n_ans = max(len(s.answer_ids) for s in samples)
    greedy = _greedy(forward, seqs, [len(s.prompt_ids) - 1 for s in samples], n_ans, tokenizer.pad_id)
    results, gens = [None] * len(samples), {}
    for i, s in enumerate(samples):
        preds = greedy[i][:len(s.answer_ids)]
        k = next((t for t, (p, a) in enumerate(zip(preds, s.answer_ids)) if p != a), len(preds))
        gen = s.answer_ids[:k] + preds[k:k + 1]
        results[i] = verdict(tokenizer.decode(gen), s.answer, len(gen), len(s.answer_ids))
        if results[i] is None:
            gens[i] = gen
    while _open_anywhere(len(gens)):
        rows = sorted(gens)
        seqs = [samples[i].prompt_ids + gens[i] for i in rows] or [[tokenizer.pad_id]]
        nxt = _greedy(forward, seqs, [len(sq) - 1 for sq in seqs], 1, tokenizer.pad_id)
        for j, i in enumerate(rows):
            gens[i].append(nxt[j][0])
            results[i] = verdict(tokenizer.decode(gens[i]), samples[i].answer, len(gens[i]),
                                 len(samples[i].answer_ids))
            if results[i] is not None:
                del gens[i]
    return results


def _batches(tokenizer, lengths, depths, trials, seed, key_digits, batch_tokens):
    """([(length index, [(depth index, Sample)...]) batch...], lengths kept, notes): the batches
    of the whole grid, formed as one process forms them (similar prompt lengths together)."""
    batches, kept, skipped = [], [], []
    for length in lengths:
        try:
            cells = [make_trials(tokenizer, length, d, trials, seed, key_digits) for d in depths]
        except ValueError as e:  # DataError: this context cannot hold the prompt
            skipped.append(f"passkey at {length} tokens skipped: {e}")
            continue
        flat = [(c, s) for c, cell in enumerate(cells) for s in cell]
        flat.sort(key=lambda cs: len(cs[1].prompt_ids))  # similar lengths share a batch
        per_batch = max(1, batch_tokens // length)
        batches += [(len(kept), flat[b:b + per_batch]) for b in range(0, len(flat), per_batch)]
        kept.append(length)
    return batches, kept, skipped


def my_rounds(n_items: int, forward) -> list:
    """The items (indices) this rank works on, round-robin over the data-parallel ranks, one per
    round; None pads the rounds so every rank runs as many forwards (they are collective under
    ZeRO-3, expert and sequence parallelism)."""
    dp_rank, dp_size, _ = eval_layout(forward)
    n_rounds = -(-n_items // dp_size)
    return [r * dp_size + dp_rank if r * dp_size + dp_rank < n_items else None for r in range(n_rounds)]


def sum_over_ranks(t: torch.Tensor, forward) -> torch.Tensor:
    """Sum of each sequence-parallel group's lead's `t` over all ranks (t itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    lead = eval_layout(forward)[2]
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = (t if lead else torch.zeros_like(t)).to(dev)
    dist.all_reduce(out)
    return out.cpu()


def passkey_grid(forward, tokenizer, lengths: list, depths: list, trials: int, seed: int = 0,
                 key_digits: int = 5, batch_tokens: int = 8192) -> dict:
    """Accuracy per (length, depth) cell; lengths too short for the prompt are skipped.
    Collective when torch.distributed is initialised: every rank calls it, does its share."""
    batches, kept, skipped = _batches(tokenizer, lengths, depths, trials, seed, key_digits, batch_tokens)
    correct = torch.zeros(len(kept), len(depths), dtype=torch.int64)
    cheapest = min(range(len(batches)), key=lambda i: sum(len(s.prompt_ids) for _, s in batches[i][1]), default=0)
    for b in my_rounds(len(batches), forward):
        li, chunk = batches[b if b is not None else cheapest]
        oks = score_batch(forward, [s for _, s in chunk], tokenizer)
        if b is None:
            continue  # a padding round: the same forwards as the others, results dropped
        for (c, _), ok in zip(chunk, oks):
            correct[li, c] += bool(ok)
    acc = (sum_over_ranks(correct, forward).double() / trials).tolist()
    return {"lengths": [int(x) for x in kept], "depths": [float(d) for d in depths], "trials": int(trials),
            "key_digits": int(key_digits), "accuracy": acc,
            "accuracy_by_length": {str(x): float(np.mean(a)) for x, a in zip(kept, acc)}, "notes": skipped}
