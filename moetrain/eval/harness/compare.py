"""Our numbers on the harness's rows, the harness's numbers from its per-row results, and
the comparison between them.

Ours use our eval code (moetrain.eval: bucket_losses, score_batch) on the very windows
and trials the rows hold. Perplexity agrees when the mean NLL per token differs by at most
PPL_TOL[backend] nats, over all rows of a length and in every row; passkey agrees when every
trial gets the same verdict.
"""
from __future__ import annotations

import math

import numpy as np

# Mean NLL per token, |harness - ours| in nats, over all rows of a length and over each row.
# Both sides run fp32 weights, so they differ only by float32 rounding of different kernels
# (ours vs transformers' eager PyTorch or vLLM's CPU kernels): a few 1e-7 relative per op,
# ~1e-6 on a token's log-probability after the layers (measured: <= 1e-6 per token for both
# backends where they compute the same model), and a mean over a row's S tokens is no larger.
# 1e-5 (perplexity within 0.001%) leaves room for that. A real difference lands far above it:
# an extra <s> before every window moves the test model's mean by ~1e-2; vLLM 0.32 on a
# Qwen2-MoE export with per-layer sliding/full attention differs from position W on by up to
# 8e-2 per token (1.7e-3 on a row's mean), which the per-row check catches even where row
# errors of both signs cancel in the mean.
PPL_TOL = {"hf": 1e-5, "vllm": 1e-5}


def our_perplexity(forward, windows_by_length: dict, kept: dict, batch_tokens: int = 8192) -> dict:
    """{length: {"windows", "nll" (all windows, = eval.json's loss@L), "kept", "nll_kept",
    "rows" {window index: its mean NLL}}}."""
    from moetrain.eval.position_loss import bucket_losses
    out = {}
    for length, windows in windows_by_length.items():
        idx = kept[length]["kept"]
        nll = float(bucket_losses(forward, windows, [(0, length)], batch_tokens)[0]) if len(windows) else None
        rows = {int(i): float(bucket_losses(forward, windows[i:i + 1], [(0, length)], batch_tokens)[0]) for i in idx}
        nll_kept = float(np.mean(list(rows.values()))) if rows else None  # equal lengths: the token mean
        out[int(length)] = {"windows": int(len(windows)), "nll": nll, "kept": len(idx), "nll_kept": nll_kept,
                            "rows": rows}
    return out


def our_passkey(forward, tokenizer, cells: dict, batch_tokens: int = 8192) -> dict:
    """{(length, depth): [verdict per trial]} by our greedy exact match (score_batch), batched
    as our grid batches them (batch_tokens // length prompts)."""
    from moetrain.eval.passkey import score_batch
    out = {}
    for (length, depth), samples in cells.items():
        per_batch = max(1, batch_tokens // length)
        oks = []
        for b in range(0, len(samples), per_batch):
            oks += [bool(x) for x in score_batch(forward, samples[b:b + per_batch], tokenizer)]
        out[(length, depth)] = oks
    return out


def harness_perplexity(samples: list) -> dict:
    """{length: {"windows", "rows" {window index: mean NLL}, "nll"}} from moetrain_heldout_ppl's rows."""
    by_len = {}
    for s in samples:
        rows = by_len.setdefault(int(s["doc"]["length"]), {})
        rows[int(s["doc"]["window"])] = (float(s["response"]), int(s["doc"]["n_tokens"]))
    return {L: {"windows": len(rows), "rows": {i: -ll / n for i, (ll, n) in rows.items()},
                "nll": -math.fsum(ll for ll, _ in rows.values()) / sum(n for _, n in rows.values())}
            for L, rows in sorted(by_len.items())}


def harness_passkey(samples: list) -> dict:
    """{(length, depth, trial): (correct, generation)} from moetrain_passkey's rows."""
    from moetrain.eval.harness.utils import passkey_correct
    return {(int(s["doc"]["length"]), float(s["doc"]["depth"]), int(s["doc"]["trial"])):
            (passkey_correct(s["response"], s["doc"]["answer"]), s["response"]) for s in samples}


def compare_perplexity(ours: dict, theirs: dict, tol: float) -> dict:
    out = {}
    for length, o in ours.items():
        t = theirs.get(length)
        if t is None or o["nll_kept"] is None:
            continue
        diff = abs(t["nll"] - o["nll_kept"])
        same_rows = set(t["rows"]) == set(o["rows"])
        diffs = [abs(t["rows"][i] - o["rows"][i]) for i in o["rows"]] if same_rows else [math.inf]
        # max() keeps whichever operand comes first when one is NaN: a NaN row must not hide
        row_diff = math.nan if any(math.isnan(x) for x in diffs) else max(diffs, default=0.0)
        out[length] = {"windows": o["kept"], "ours_nll": o["nll_kept"], "harness_nll": t["nll"],
                       "ours_ppl": math.exp(o["nll_kept"]), "harness_ppl": math.exp(t["nll"]),
                       "abs_diff": diff, "max_row_diff": row_diff,
                       "agree": diff <= tol and row_diff <= tol}  # False when either is NaN
    return out


def compare_passkey(ours: dict, theirs: dict) -> dict:
    """Per length: accuracy of ours and the harness on the same trials, and the trials that differ."""
    out = {}
    for (length, depth), oks in ours.items():
        cell = out.setdefault(length, {"trials": 0, "ours": 0, "harness": 0, "differ": []})
        for t, ok in enumerate(oks):
            if (length, depth, t) not in theirs:
                continue  # dropped row (does not round-trip): counted in the rows report
            hit, gen = theirs[(length, depth, t)]
            cell["trials"] += 1
            cell["ours"] += ok
            cell["harness"] += hit
            if hit != ok:
                cell["differ"].append({"depth": depth, "trial": t, "ours": ok, "harness_generation": gen})
    for cell in out.values():
        n = max(1, cell["trials"])
        cell.update(ours_acc=cell["ours"] / n, harness_acc=cell["harness"] / n, agree=not cell["differ"])
    return out


def our_grid_accuracy(ours: dict) -> dict:
    """{length: accuracy over all trials} (our grid's accuracy_by_length, dropped rows included)."""
    acc = {}
    for (length, _), oks in ours.items():
        acc.setdefault(length, []).extend(oks)
    return {L: float(np.mean(v)) for L, v in acc.items()}
