#!/usr/bin/env python
"""CPU experiment (issue 7): can a tiny MoE pretrained at L tokens retrieve a pass key at
4L after a short extension stage, and which RoPE scaling makes that work?

    nice -n 10 python scripts/exp_context_extension.py --out runs/exp_ctx

1. Pretrain once with moetrain's trainer: stage `pre` at L tokens, passkey rows mixed
   into the Gutenberg data (data.synthetic). Its stage-end eval at L and 4L is the
   "no extension" baseline (the pretrained model evaluated at 4L as it is).
2. Zero-shot: the pretrained weights with each scaling switched on, no training.
3. For each method (none = plain RoPE, pi = linear, ntk = static NTK, yarn, yarn_ctx =
   YaRN with its betas rescaled to this context, see rope_of), copy the
   pretraining run and resume it into stage `ext`: <= 200 steps at 4L with that RoPE,
   identical data, seed, LR schedule and optimizer state; then evaluate at L and 4L.

Every evaluation is moetrain.eval's: passkey retrieval (greedy decoding, exact match;
--trials per depth) and loss by position on held-out windows. Writes OUT/results.json,
OUT/results.md and OUT/<run>/eval/<stage>/eval.json + PNGs. Rerunning reuses finished runs
and resumes an interrupted pretraining; delete OUT to start over.
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("none", "pi", "ntk", "yarn", "yarn_ctx")


def rope_of(method: str, L: int) -> str:
    """RoPE of the extension stage (factor 4 = 4L / L) as a YAML mapping.

    yarn uses the paper's beta_fast=32, beta_slow=1 (rotations over the original context,
    tuned for LLaMA at 4096 tokens). At L=128 no dimension of a 32-wide head turns 32
    times, so it scales nearly every dimension. yarn_ctx (added after seeing that) keeps
    the paper's thresholds in tokens instead: beta x L/4096, i.e. wavelengths under 128
    tokens kept, over 4096 interpolated."""
    if method == "yarn_ctx":
        return f"{{type: yarn, factor: 4.0, beta_fast: {32 * L / 4096}, beta_slow: {L / 4096}}}"
    return {"none": "{type: none}", "pi": "{type: linear, factor: 4.0}", "ntk": "{type: ntk, factor: 4.0}",
            "yarn": "{type: yarn, factor: 4.0}"}[method]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/exp_context_extension", help="output folder (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="pretraining context L (default: %(default)s)")
    p.add_argument("--pretrain-steps", type=int, default=3000, help="(default: %(default)s)")
    p.add_argument("--ext-steps", type=int, default=200, help="extension steps at 4L, <= 200 (default: %(default)s)")
    p.add_argument("--trials", type=int, default=100, help="passkey trials per depth (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of %(default)s")
    p.add_argument("--data-dir", default="data/gutenberg_classics", help="prepared corpus (default: %(default)s)")
    return p.parse_args(argv)


def overrides(args, ext_rope: str) -> list:
    """The tiny model and both stages; only the extension stage's RoPE differs between runs."""
    L = args.seq_len
    ov = {
        "name": "exp_context_extension",
        "model.hidden_size": 128, "model.n_layers": 4, "model.n_heads": 4, "model.n_kv_heads": 4,
        "model.intermediate_size": 256, "model.qk_norm": "false",
        "model.moe.n_experts": 4, "model.moe.top_k": 2, "model.moe.intermediate_size": 128,
        "model.moe.first_k_dense": 0, "model.attention.layer_types": "[full]",
        "model.rope": "{type: none, theta: 10000}",
        "data.dir": args.data_dir, "data.synthetic": "{passkey: 0.8}",
        "train.micro_batch_size": 8, "train.eval_batches": 4,
        "stages": f"[{{name: pre, seq_len: {L}, steps: {args.pretrain_steps}}}, "
                  f"{{name: ext, seq_len: {4 * L}, steps: {args.ext_steps}, lr: 1.0e-3, warmup_steps: 20, "
                  f"rope: {ext_rope}}}]",
        "optim.lr": 3e-3, "optim.warmup_steps": 30, "deepspeed.zero_stage": 0,
        "checkpoint.every_steps": 500, "logging.every_steps": 25, "logging.console": "plain",
        "logging.wandb.mode": "disabled",
        "eval.lengths": f"[{L}, {4 * L}]", "eval.passkey_trials": args.trials, "eval.loss_documents": 32,
    }
    return [f"{k}={v}" for k, v in ov.items()]


def _done(run_dir: str, step: int) -> bool:
    from moetrain import checkpoint as ckpt
    newest = ckpt.newest_complete(os.path.join(run_dir, "checkpoints"))
    return newest is not None and ckpt.read_client_state(newest)["step"] >= step


def pretrain(args) -> str:
    from moetrain.config import load_config
    from moetrain.compose import train
    run = os.path.join(args.out, "pretrain")
    if not _done(run, args.pretrain_steps):  # resumes an interrupted pretraining (checkpoints every 500)
        cfg = load_config("configs/default.yaml", overrides(args, rope_of("none", args.seq_len)) +
                          [f"train.max_steps={args.pretrain_steps}"])
        train(cfg, run, resume="auto")
    return run


def extend(args, method: str, pre: str) -> str:
    """Resume a copy of the pretraining run into the extension stage with `method`'s RoPE."""
    from moetrain.config import load_config
    from moetrain.compose import train
    run = os.path.join(args.out, f"ext_{method}")
    if not _done(run, args.pretrain_steps + args.ext_steps):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pre, run, ignore=shutil.ignore_patterns("wandb"))  # eval/pre: per-stage plot
        train(load_config("configs/default.yaml", overrides(args, rope_of(method, args.seq_len))), run, resume="auto")
    return run


def zero_shot(args, method: str, pre: str) -> dict:
    """The pretrained weights evaluated at L and 4L with `method`'s scaling and no training."""
    import dataclasses

    import yaml

    from moetrain.config import RopeConfig
    from moetrain.data import load_tokenizer
    from moetrain.eval import evaluate, write_result
    from moetrain.eval.loading import load_run_model, model_forward
    model, cfg, _, _, _ = load_run_model(pre)
    L = args.seq_len
    rope = RopeConfig(**yaml.safe_load(rope_of(method, L)), original_max_position_embeddings=L)
    model.set_rope(dataclasses.replace(rope, theta=cfg.model.rope.theta), 4 * L)
    res = evaluate(model_forward(model), load_tokenizer(args.data_dir), args.data_dir, [L, 4 * L], cfg.eval)
    write_result(res, os.path.join(args.out, "zero_shot", method), f"zero-shot {method}")
    return res


def read_eval(run: str, stage: str) -> dict:
    with open(os.path.join(run, "eval", stage, "eval.json")) as f:
        return json.load(f)


def row(name: str, res: dict, L: int) -> dict:
    """One line of the results: passkey at L and 4L (and per depth at 4L), loss by position at 4L."""
    pk = res["passkey"]
    acc = dict(zip(pk["lengths"], pk["accuracy"]))
    curve = res["loss_by_position"].get(str(4 * L), {})
    return {"run": name, "passkey@L": pk["accuracy_by_length"].get(str(L)),
            "passkey@4L": pk["accuracy_by_length"].get(str(4 * L)), "passkey@4L_by_depth": acc.get(4 * L),
            "depths": pk["depths"], "trials_per_depth": pk["trials"], "loss@4L": curve.get("mean"),
            "loss_by_position@4L": curve.get("loss"), "bucket_start": curve.get("bucket_start"),
            "bucket_end": curve.get("bucket_end")}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(rows: list, args) -> str:
    L = args.seq_len
    depths = rows[0]["depths"]
    head = (f"| run (L={L}, 4L={4 * L}) | passkey@L | passkey@4L | " +
            " | ".join(f"d={d:g}" for d in depths) + " | loss@4L |")
    lines = [head, "|" + "---|" * (4 + len(depths))]
    for r in rows:
        by_depth = r["passkey@4L_by_depth"] or [None] * len(depths)
        loss = "-" if r["loss@4L"] is None else f"{r['loss@4L']:.3f}"
        lines.append(f"| {r['run']} | {_pct(r['passkey@L'])} | **{_pct(r['passkey@4L'])}** | " +
                     " | ".join(_pct(a) for a in by_depth) + f" | {loss} |")
    b = rows[0]
    lines += ["", f"Loss by position at 4L = {4 * L} (held-out Gutenberg windows, nats/token; columns are "
              "position buckets):", "",
              "| run | " + " | ".join(f"{a}-{e}" for a, e in zip(b["bucket_start"], b["bucket_end"])) + " |",
              "|---|" + "---|" * len(b["bucket_start"])]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(f"{x:.2f}" for x in r["loss_by_position@4L"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not 1 <= args.ext_steps <= 200 or args.seq_len < 96:
        print(f"error: methods must be among {', '.join(METHODS)}, 1 <= --ext-steps <= 200, --seq-len >= 96 "
              "(the passkey prompt needs ~90 tokens)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    t0, times = time.time(), {}
    pre = pretrain(args)
    times["pretrain_s"] = time.time() - t0
    L = args.seq_len
    rows = [row("no extension (pretrained, plain RoPE)", read_eval(pre, "pre"), L)]
    t = time.time()
    for m in methods:
        if m != "none":
            rows.append(row(f"zero-shot {m}, no training", zero_shot(args, m, pre), L))
    times["zero_shot_s"] = time.time() - t
    for m in methods:
        t = time.time()
        rows.append(row(f"{m} + {args.ext_steps} steps at 4L", read_eval(extend(args, m, pre), "ext"), L))
        times[f"ext_{m}_s"] = time.time() - t
    times["total_s"] = time.time() - t0
    md = markdown(rows, args)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "seconds": times}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    print(json.dumps({k: round(v) for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
