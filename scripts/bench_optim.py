"""AdamW vs Muon (and cosine vs WSD) on one config: same steps, same seed.

Each run is its own `scripts/train.py` subprocess in its own run folder (W&B off);
writes loss_curves.png and prints a table: final loss (mean of the last 10 logged
steps) and the steps Muon needs to reach AdamW's final loss, as a fraction of AdamW's.

    python scripts/bench_optim.py --out runs/bench_optim --steps 200 \
        --set 'stages=[{name: short, seq_len: 256, steps: 200}]'
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"adamw-cosine": ["optim.name=adamw", "optim.schedule=cosine"],
        "muon-cosine": ["optim.name=muon", "optim.schedule=cosine"],
        "adamw-wsd": ["optim.name=adamw", "optim.schedule=wsd"],
        "muon-wsd": ["optim.name=muon", "optim.schedule=wsd"]}
# Muon needs whole matrices (ZeRO 0); both optimizers run at the same stage for a fair race.
COMMON = ["deepspeed.zero_stage=0", "logging.wandb.mode=disabled", "logging.every_steps=1",
          "logging.console=plain", "export.enabled=false", "eval.enabled=false", "checkpoint.every_steps=100000"]
SMOOTH = 10


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "event" not in r and r.get("loss") is not None}


def _smooth(losses: dict[int, float]) -> tuple[list[int], list[float]]:
    steps = sorted(losses)
    vals = [losses[s] for s in steps]
    return steps, [sum(vals[max(0, i - SMOOTH + 1):i + 1]) / len(vals[max(0, i - SMOOTH + 1):i + 1])
                   for i in range(len(vals))]


def _run(name: str, args, extra: list[str]) -> str:
    run_dir = os.path.join(args.out, name)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", args.config, "--run-dir", run_dir,
           "--resume", "never", "--overwrite"]
    for s in COMMON + [f"train.max_steps={args.steps}"] + args.set + extra:
        cmd += ["--set", s]
    print(f"[bench_optim] {name}: {' '.join(cmd)}", flush=True)
    with open(os.path.join(args.out, f"{name}.log"), "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"error: run {name} failed, see {args.out}/{name}.log")
    return run_dir


def _steps_to_reach(curve: tuple[list[int], list[float]], target: float) -> int | None:
    return next((s for s, v in zip(*curve) if v <= target), None)


def _table(curves: dict) -> str:
    lines = ["| run | final loss | steps to reach AdamW's final loss (fraction of AdamW's) |", "|---|---|---|"]
    for name, curve in curves.items():
        base = curves.get(name.replace("muon", "adamw"))
        reach = "-"
        if name.startswith("muon") and base:
            hit = _steps_to_reach(curve, base[1][-1])
            reach = f"{hit} ({hit / base[0][-1]:.0%})" if hit else f"not reached in {curve[0][-1]}"
        lines.append(f"| {name} | {curve[1][-1]:.4f} | {reach} |")
    return "\n".join(lines)


def _plot(curves: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (steps, vals) in curves.items():
        ax.plot(steps, vals, label=name, linestyle="-" if "cosine" in name else "--")
    ax.set(title=title, xlabel="optimizer step", ylabel=f"train loss (nats/token, {SMOOTH}-step mean)")
    lo = min(min(v[len(v) // 3:]) for _, v in curves.values())
    hi = max(v[len(v) // 3] for _, v in curves.values())
    ax.set_ylim(lo - 0.1, hi + 0.3)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "default.yaml"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_optim"))
    p.add_argument("--steps", type=int, default=300, help="train.max_steps of every run")
    p.add_argument("--set", action="append", default=[], help="dotted.key=value for every run")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    args = p.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {unknown}: pick from {','.join(RUNS)}")
    os.makedirs(args.out, exist_ok=True)
    curves = {n: _smooth(_losses(_run(n, args, RUNS[n]))) for n in names}
    png = os.path.join(args.out, "loss_curves.png")
    _plot(curves, png, f"AdamW vs Muon, cosine vs WSD ({os.path.basename(args.config)}, {args.steps} steps, "
                       f"same seed)")
    table = _table(curves)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"[bench_optim] plot: {png}")


if __name__ == "__main__":
    main()
