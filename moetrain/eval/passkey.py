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

`forward(input_ids [B, S] long, position_ids=None) -> logits [B, S, V]`.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.distributed as dist

from moetrain.data.synthetic import passkey_sample

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


def _argmax_at(logits: torch.Tensor, row: int, start: int, n: int) -> list:
    return logits[row, start:start + n].argmax(-1).tolist()


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
    logits = forward(_pad_batch(seqs, tokenizer.pad_id))
    results, gens = [None] * len(samples), {}
    for i, s in enumerate(samples):
        preds = _argmax_at(logits, i, len(s.prompt_ids) - 1, len(s.answer_ids))
        k = next((t for t, (p, a) in enumerate(zip(preds, s.answer_ids)) if p != a), len(preds))
        gen = s.answer_ids[:k] + preds[k:k + 1]
        results[i] = verdict(tokenizer.decode(gen), s.answer, len(gen), len(s.answer_ids))
        if results[i] is None:
            gens[i] = gen
    del logits
    while _open_anywhere(len(gens)):
        rows = sorted(gens)
        seqs = [samples[i].prompt_ids + gens[i] for i in rows] or [[tokenizer.pad_id]]
        logits = forward(_pad_batch(seqs, tokenizer.pad_id))
        for j, i in enumerate(rows):
            gens[i].append(_argmax_at(logits, j, len(seqs[j]) - 1, 1)[0])
            results[i] = verdict(tokenizer.decode(gens[i]), samples[i].answer, len(gens[i]),
                                 len(samples[i].answer_ids))
            if results[i] is not None:
                del gens[i]
    return results


def passkey_grid(forward, tokenizer, lengths: list, depths: list, trials: int, seed: int = 0,
                 key_digits: int = 5, batch_tokens: int = 8192) -> dict:
    """Accuracy per (length, depth) cell; lengths too short for the prompt are skipped."""
    acc, skipped = {}, []
    for length in lengths:
        try:
            cells = [make_trials(tokenizer, length, d, trials, seed, key_digits) for d in depths]
        except ValueError as e:  # DataError: this context cannot hold the prompt
            skipped.append(f"passkey at {length} tokens skipped: {e}")
            continue
        flat = [(c, s) for c, cell in enumerate(cells) for s in cell]
        flat.sort(key=lambda cs: len(cs[1].prompt_ids))  # similar lengths share a batch
        per_batch = max(1, batch_tokens // length)
        correct = np.zeros(len(depths))
        for b in range(0, len(flat), per_batch):
            chunk = flat[b:b + per_batch]
            for (c, _), ok in zip(chunk, score_batch(forward, [s for _, s in chunk], tokenizer)):
                correct[c] += bool(ok)
        acc[length] = [float(x) for x in correct / trials]
    return {"lengths": [int(x) for x in acc], "depths": [float(d) for d in depths], "trials": int(trials),
            "key_digits": int(key_digits), "accuracy": [acc[x] for x in acc],
            "accuracy_by_length": {str(x): float(np.mean(a)) for x, a in acc.items()}, "notes": skipped}
