#!/usr/bin/env python
"""Kill stress (not in CI): train, SIGKILL the run at random moments - some provably inside
a checkpoint save - relaunch the same command until it finishes, and compare with one
uninterrupted run of the same config.

    python scripts/stress_faults.py --trials 20 --out /tmp/stress
    python scripts/stress_faults.py --config configs/default.yaml --set data.dir=data/x --trials 5

By default a reduced run of --config (a small model, --steps steps, a checkpoint every
--every steps, W&B, eval and export off; --set wins over these). Each trial kills its run
1 to --max-kills times: at a random moment of a random step, or (half of the kills) while
a save is paused inside one of its phases:
  begin    after rank 0 cleared leftovers, before any file is written
  written  every file is in the temporary step_N.tmp-<pid> folder, not yet renamed
  renamed  the folder is renamed to step_N, its COMPLETE marker not yet written
The pause (--pause seconds) is added by this script around moetrain.checkpoint's own save
(the training child runs through `--child`); the reference run has none.

Printed: trials, survived (the last relaunch finished every step with exit 0), kills that
landed, steps lost beyond the last complete checkpoint (logged steps that had to be
recomputed, per kill), and how many trials were bit-identical to the uninterrupted run
(every step's loss in metrics.jsonl and every final weight). --json writes the same numbers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("begin", "written", "renamed")
SMALL = {"model.hidden_size": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
         "model.intermediate_size": 128, "model.moe.n_experts": 4, "model.moe.top_k": 2,
         "model.moe.intermediate_size": 64, "model.moe.first_k_dense": 0,
         "model.attention.layer_types": "[sliding, full]", "model.attention.window": 32,
         "train.micro_batch_size": 4, "train.eval_batches": 1, "optim.warmup_steps": 3,
         "logging.every_steps": 1, "logging.console": "plain", "logging.wandb.mode": "disabled",
         "eval.enabled": "false", "export.enabled": "false", "checkpoint.keep_last": 2,
         "data.synthetic": "{}"}  # passkey rows need ~100 tokens; these sequences have 64


# --------------------------------------------------------------------------- the training child
def _install_save_pauses(flag_dir: str, pause: float) -> None:
    """Wrap moetrain.checkpoint.store.save's steps: at each phase write a flag file
    FLAG_DIR/<n>-<phase>-<step> and sleep `pause` s, so a kill can be timed inside a save."""
    from moetrain.checkpoint import layout, store
    os.makedirs(flag_dir, exist_ok=True)
    count = [0]

    def mark(phase: str, step: int) -> None:
        count[0] += 1
        with open(os.path.join(flag_dir, f"{os.getpid()}.{count[0]:04d}-{phase}-{step}"), "w"):
            pass
        time.sleep(pause)

    write_rank_files, write_json = store._write_rank_files, store._write_json

    def _write_rank_files(engine, ckpt_root, tmp_tag, client, rank_state, rank, ep_groups):
        step = int(tmp_tag[len(layout.TAG_PREFIX):].split(layout.TMP_MARK)[0])
        mark("begin", step)
        write_rank_files(engine, ckpt_root, tmp_tag, client, rank_state, rank, ep_groups)
        mark("written", step)

    def _write_json(path, obj, indent=None):
        if os.path.basename(path) == layout.MARKER:
            mark("renamed", int(obj))  # the marker's content is the step
        write_json(path, obj, indent)

    store._write_rank_files, store._write_json = _write_rank_files, _write_json


def child_main(flag_dir: str, pause: float, train_args: list) -> int:
    """scripts/train.py's main with paused saves (pause 0: unchanged)."""
    import importlib.util
    sys.path.insert(0, ROOT)
    if pause > 0:
        _install_save_pauses(flag_dir, pause)
    spec = importlib.util.spec_from_file_location("moetrain_train_cli", os.path.join(ROOT, "scripts", "train.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main(train_args)


def child_command(run_dir: str, config: str, sets: list, flag_dir: str = "", pause: float = 0.0) -> list:
    args = ["--config", config, "--run-dir", run_dir] + [x for s in sets for x in ("--set", s)]
    return [sys.executable, os.path.abspath(__file__), "--child", flag_dir or "-", str(pause), "--"] + args


def child_env() -> dict:
    return dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# --------------------------------------------------------------------------- reading a run
def step_losses(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            lines = [line for line in f if line.strip()]
    except OSError:  # not written yet
        return {}
    recs = []
    for line in lines:
        try:
            recs.append(json.loads(line))
        except ValueError:  # a line half written at the kill
            pass
    return {r["step"]: r["loss"] for r in recs if "event" not in r}


def newest_step(run_dir: str) -> int:
    from moetrain.checkpoint import RunDir
    newest = RunDir(run_dir).newest_complete()
    return int(os.path.basename(newest)[5:]) if newest else 0


def final_weights(run_dir: str) -> dict:
    from moetrain import load_model
    return {k: v.clone() for k, v in load_model(run_dir).state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- one trial
def _wait(proc, until, timeout: float) -> bool:
    """Poll until `until()` holds (True) or the process ends first (False)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if until():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError(f"the run did not get there within {timeout:.0f} s")


def _kill_plan(rng: random.Random, steps: int, every: int, max_kills: int, mode: str = "mixed") -> list:
    """Increasing kill targets: ("step", s, delay fraction) or ("save", s, phase, delay fraction)."""
    saves = [s for s in range(every, steps, every)] + [steps]
    plan = []
    for _ in range(rng.randint(1, max_kills)):
        save = rng.random() < 0.5 if mode == "mixed" else mode == "save"
        if save:
            plan.append(("save", rng.choice(saves), rng.choice(PHASES), rng.random()))
        else:
            plan.append(("step", rng.randint(1, steps - 1), rng.random()))
    return sorted(plan, key=lambda k: (k[1], k[0] == "save"))


def _launch_and_kill(cmd: list, run_dir: str, flag_dir: str, kill, step_s: float, pause: float,
                     timeout: float) -> dict:
    """One launch; SIGKILL at `kill` (None: run to the end). Returns what happened."""
    seen = set(os.listdir(flag_dir)) if os.path.isdir(flag_dir) else set()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    landed = False
    try:
        if kill is not None:
            if kill[0] == "step":
                ready = lambda: max(step_losses(run_dir), default=0) >= kill[1]  # noqa: E731
                delay = kill[2] * step_s
            else:
                tag = f"-{kill[2]}-{kill[1]}"
                ready = lambda: any(f.endswith(tag) and f not in seen  # noqa: E731
                                    for f in (os.listdir(flag_dir) if os.path.isdir(flag_dir) else ()))
                delay = kill[3] * pause * 0.9  # inside the pause, before the save moves on
            if _wait(proc, ready, timeout):
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    landed = True
        err = proc.communicate(timeout=timeout)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = {"rc": proc.returncode, "landed": landed, "err": err[-2000:] if err else ""}
    if landed:  # logged steps past the newest complete checkpoint: the relaunch recomputes them
        out["lost"] = max(max(step_losses(run_dir), default=0) - newest_step(run_dir), 0)
    return out


def run_trial(i: int, args, sets: list, ref: dict, step_s: float) -> dict:
    rng = random.Random(args.seed * 1000 + i)
    run_dir, flag_dir = os.path.join(args.out, f"trial{i:03d}"), os.path.join(args.out, f"trial{i:03d}.flags")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(flag_dir, ignore_errors=True)
    plan = _kill_plan(rng, args.steps, args.every, args.max_kills, args.mode)
    cmd = child_command(run_dir, args.config, sets, flag_dir, args.pause)
    kills, launches = [], 0
    for kill in plan + [None]:
        launches += 1
        res = _launch_and_kill(cmd, run_dir, flag_dir, kill, step_s, args.pause, args.timeout)
        if kill is not None:
            kills.append({"at": list(kill), **{k: res[k] for k in ("landed", "lost") if k in res}})
            if not res["landed"] and res["rc"] != 0:
                return {"trial": i, "survived": False, "kills": kills, "error": res["err"]}
    losses = step_losses(run_dir)
    survived = res["rc"] == 0 and sorted(losses) == list(range(1, args.steps + 1))
    identical = survived and losses == ref["losses"] and same_weights(final_weights(run_dir), ref["weights"])
    out = {"trial": i, "survived": survived, "bit_identical": identical, "launches": launches, "kills": kills}
    if not survived:
        out["error"] = res["err"]
    if not args.keep and identical:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(flag_dir, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- driver
def reduced_sets(args) -> list:
    """SMALL, the steps split over the config's stages (at most 2, sequences of at most 64
    and 128 tokens), the checkpoint cadence, then the user's --set (which win)."""
    from moetrain.config import load_config
    cfg = load_config(args.config, args.set)
    if args.full:
        base = {"train.max_steps": args.steps, "checkpoint.every_steps": args.every, "logging.every_steps": 1,
                "logging.wandb.mode": "disabled", "logging.console": "plain"}
    else:
        base = {**SMALL, "checkpoint.every_steps": args.every, "train.max_steps": "null"}
        n = min(len(cfg.stages), 2)
        if len(cfg.stages) > n:
            base["stages"] = "[" + ", ".join(f"{{name: {s.name}, seq_len: {s.seq_len}, steps: {s.steps}}}"
                                             for s in cfg.stages[:n]) + "]"
        first = args.steps if n == 1 else (2 * args.steps) // 3
        for i, (steps, seq) in enumerate(((first, 64), (args.steps - first, 128))[:n]):
            base[f"stages.{i}.steps"], base[f"stages.{i}.seq_len"] = steps, min(cfg.stages[i].seq_len, seq)
            base[f"stages.{i}.warmup_steps"] = min(3, steps)
    user = dict(s.split("=", 1) for s in args.set)
    return [f"{k}={v}" for k, v in {**base, **user}.items()]


def reference(args, sets: list) -> tuple[dict, float]:
    run_dir = os.path.join(args.out, "reference")
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    r = subprocess.run(child_command(run_dir, args.config, sets), cwd=ROOT, env=child_env(), capture_output=True,
                       text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise SystemExit(f"error: the uninterrupted reference run failed (exit {r.returncode}): "
                         f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    losses = step_losses(run_dir)
    return {"losses": losses, "weights": final_weights(run_dir)}, (time.time() - t0) / max(len(losses), 1)


def summarize(results: list) -> dict:
    kills = [k for r in results for k in r["kills"] if k.get("landed")]
    lost = [k["lost"] for k in kills]
    return {"trials": len(results), "survived": sum(r["survived"] for r in results),
            "bit_identical": sum(bool(r.get("bit_identical")) for r in results),
            "kills_landed": len(kills), "kills_in_saves": sum(k["at"][0] == "save" for k in kills),
            "steps_lost_total": sum(lost), "steps_lost_max": max(lost, default=0),
            "steps_lost_mean": round(sum(lost) / len(lost), 2) if lost else 0.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "default.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (wins)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of the reduced run")
    p.add_argument("--every", type=int, default=5, help="checkpoint.every_steps of the reduced run")
    p.add_argument("--full", action="store_true", help="the config as it is (only the step cap and cadence set)")
    p.add_argument("--max-kills", type=int, default=3, help="kills per trial: 1 to this many")
    p.add_argument("--mode", choices=("mixed", "save", "step"), default="mixed",
                   help="where kills land: inside saves, at random moments of steps, or half and half")
    p.add_argument("--pause", type=float, default=0.5, help="seconds each save phase pauses in killed runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-trial", type=int, default=0, help="number the trials from here (split a campaign)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "stress_faults"))
    p.add_argument("--timeout", type=float, default=900, help="seconds one launch may take")
    p.add_argument("--keep", action="store_true", help="keep the run folders of bit-identical trials")
    p.add_argument("--json", default=None, help="also write the summary and every trial here")
    args = p.parse_args(argv)
    if args.steps < 2 or args.every < 1 or args.trials < 1 or args.max_kills < 1 or args.pause <= 0:
        p.error("--steps >= 2, --every >= 1, --trials >= 1, --max-kills >= 1 and --pause > 0 are required")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    os.makedirs(args.out, exist_ok=True)
    sets = reduced_sets(args)
    ref, step_s = reference(args, sets)
    results = []
    for i in range(args.first_trial, args.first_trial + args.trials):
        r = run_trial(i, args, sets, ref, step_s)
        results.append(r)
        print(f"trial {i}: survived={r['survived']} bit_identical={r.get('bit_identical')} "
              f"kills={[(k['at'][0], k['at'][1], k['at'][2] if k['at'][0] == 'save' else '') for k in r['kills']]} "
              f"landed={[k['landed'] for k in r['kills']]} lost={[k.get('lost') for k in r['kills']]}"
              + (f" error={r['error'].strip().splitlines()[-1] if r.get('error', '').strip() else ''}"
                 if not r["survived"] else ""), flush=True)
    summary = summarize(results)
    print(" ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "trials": results, "sets": sets}, f, indent=1)
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sep = sys.argv.index("--")
        flags, pause = sys.argv[2], float(sys.argv[3])
        sys.exit(child_main("" if flags == "-" else flags, pause, sys.argv[sep + 1:]))
    s = main()
    sys.exit(0 if s["survived"] == s["trials"] == s["bit_identical"] else 1)
