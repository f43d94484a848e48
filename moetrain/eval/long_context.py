"""The long-context evaluation: passkey grid + loss by position, eval.json, plots, W&B.

`evaluate` works on any eval forward (moetrain/eval/loading.py: the training
engine at stage ends, a loaded checkpoint, a transformers model in
scripts/eval_long.py), which projects onto the vocabulary only the positions a
metric needs: never a [B, S, V] logits tensor, whatever the length. Under
torch.distributed every rank calls it; the passkey batches and loss windows are
split over the data-parallel ranks (a sequence-parallel group shares one batch)
and the results summed, so every rank returns the full result.

eval.json holds: settings, passkey (lengths, depths, trials, accuracy[length][depth],
accuracy_by_length, overall), loss_by_position ({length: bucket_start, bucket_end,
loss, mean, windows}), metrics (the flat summary), notes (what was skipped and
why), seconds; stage ends add stage, stage_index, seq_len and rope.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from moetrain.eval.passkey import passkey_grid
from moetrain.eval.plots import plot_loss_by_position, write_plots
from moetrain.eval.position_loss import loss_by_position

EVAL_JSON = "eval.json"


def evaluate(forward, tokenizer, data_dir, lengths: list, ecfg, trials=None) -> dict:
    """Passkey accuracy and loss by position at each length. `data_dir` (held-out
    documents) may be None: the loss curves are then skipped with a note."""
    t0 = time.time()
    trials = trials or ecfg.passkey_trials
    settings = {"lengths": [int(x) for x in lengths], "depths": [float(d) for d in ecfg.depths],
                "trials": int(trials), "key_digits": ecfg.key_digits, "seed": ecfg.seed,
                "loss_documents": ecfg.loss_documents, "position_buckets": ecfg.position_buckets}
    grid = passkey_grid(forward, tokenizer, lengths, ecfg.depths, trials, ecfg.seed, ecfg.key_digits,
                        ecfg.batch_tokens)
    notes = grid.pop("notes")
    cells = [a for row in grid["accuracy"] for a in row]
    grid["overall"] = float(np.mean(cells)) if cells else None
    curves = {}
    for length in lengths:
        if data_dir is None:
            notes.append(f"loss by position at {length} skipped: no held-out data (give --data-dir)")
            continue
        try:
            curves[str(length)] = loss_by_position(forward, data_dir, length, ecfg.loss_documents,
                                                   ecfg.position_buckets, ecfg.batch_tokens)
        except ValueError as e:  # no eval split, or no document that long
            notes.append(f"loss by position at {length} skipped: {e}")
    return {"settings": settings, "passkey": grid, "loss_by_position": curves, "notes": notes,
            "seconds": round(time.time() - t0, 2)}


def flat_metrics(result: dict, main_length: int) -> dict:
    """JSON scalars for metrics.jsonl / W&B: passkey_acc, passkey_acc@L, loss@L,
    loss_pos_first@L, loss_pos_last@L, and unsuffixed loss_pos_* at `main_length`
    (or the longest length evaluated)."""
    out = {}
    grid = result["passkey"]
    if grid["overall"] is not None:
        out["passkey_acc"] = grid["overall"]
    for length, acc in grid["accuracy_by_length"].items():
        out[f"passkey_acc@{length}"] = acc
    curves = result["loss_by_position"]
    for length, c in curves.items():
        out[f"loss@{length}"] = c["mean"]
        out[f"loss_pos_first@{length}"] = c["loss"][0]
        out[f"loss_pos_last@{length}"] = c["loss"][-1]
    if curves:
        main = str(main_length) if str(main_length) in curves else max(curves, key=int)
        out["loss_pos_first"], out["loss_pos_last"] = curves[main]["loss"][0], curves[main]["loss"][-1]
    out["eval_seconds"] = result["seconds"]
    return out


def write_result(result: dict, out_dir: str, title: str) -> list:
    """eval.json (atomically) and the PNGs; returns the PNG paths."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, EVAL_JSON)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return write_plots(result, out_dir, title)


def plot_stages(eval_root: str) -> str | None:
    """RUN_DIR/eval/loss_by_position_stages.png: every finished stage's curves in one plot."""
    found = []
    for name in sorted(os.listdir(eval_root)):
        path = os.path.join(eval_root, name, EVAL_JSON)
        if os.path.isfile(path):
            with open(path) as f:
                res = json.load(f)
            if "stage" in res:
                found.append(res)
    curves = {f"{r['stage']} @ {n}": c for r in sorted(found, key=lambda r: r.get("stage_index", 0))
              for n, c in r["loss_by_position"].items()}
    if not curves:
        return None
    return plot_loss_by_position(curves, os.path.join(eval_root, "loss_by_position_stages.png"),
                                 "loss by position, per stage")


def _log_images(wandb_run, stage: str, paths: list) -> None:
    import wandb
    images = {f"eval/{stage}/{os.path.splitext(os.path.basename(p))[0]}": wandb.Image(p) for p in paths}
    # commit=False: the images join the step of the stage_end record the loop logs next.
    wandb_run.log(images, commit=False)


def evaluate_stage(forward, cfg, plan, out_dir: str, write: bool = True, wandb_run=None) -> dict:
    """Stage-end evaluation (called by the training loop on every rank, same forwards
    everywhere). Lengths: cfg.eval.lengths, else the stage's seq_len. Writes
    out_dir/eval.json + PNGs when `write`; returns the flat metrics."""
    from moetrain.config import to_dict
    from moetrain.data import load_tokenizer
    ecfg = cfg.eval
    lengths = [int(x) for x in ecfg.lengths] or [plan.seq_len]
    result = evaluate(forward, load_tokenizer(plan.data.dir), plan.data.dir, lengths, ecfg)
    rope = dataclasses.replace(plan.rope, original_max_position_embeddings=plan.original_max_position_embeddings)
    result.update(stage=plan.name, stage_index=plan.index, seq_len=plan.seq_len, rope=to_dict(rope))
    metrics = flat_metrics(result, plan.seq_len)
    result["metrics"] = metrics
    if write:
        paths = write_result(result, out_dir, f"stage {plan.name}")
        overlay = plot_stages(os.path.dirname(os.path.abspath(out_dir)))
        if wandb_run is not None:
            _log_images(wandb_run, plan.name, paths + ([overlay] if overlay else []))
    return metrics
