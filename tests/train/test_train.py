"""End-to-end training on CPU: ZeRO stages, 2-process equivalence, kill -9 resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import ROOT, tiny_overrides

from moetrain.config import load_config
from moetrain.compose import train

DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
TRAIN = os.path.join(ROOT, "scripts", "train.py")


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "event" not in r}


def grad_norms(run_dir):
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir) if "event" not in r}


def cli(args, **kw):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, **kw)


def sets(overrides):
    return [x for ov in overrides for x in ("--set", ov)]


@pytest.fixture(scope="module")
def zero_runs(tiny_data, tmp_path_factory):
    """20 steps at each ZeRO stage, in this process (one gloo group of 1)."""
    out = {}
    for z in (0, 1, 2, 3):
        run = str(tmp_path_factory.mktemp(f"zero{z}"))
        cfg = load_config(DEFAULT, tiny_overrides(tiny_data, **{"deepspeed.zero_stage": z}))
        train(cfg, run, resume="never")
        out[z] = run
    return out


@pytest.mark.parametrize("z", [0, 1, 2, 3])
def test_zero_stage_runs_20_steps(zero_runs, z):
    run = zero_runs[z]
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 21))
    ref = step_losses(zero_runs[0])
    for s in losses:  # ZeRO only changes where state lives, not the math
        assert losses[s] == pytest.approx(ref[s], rel=1e-5), (z, s)
    assert os.path.isfile(os.path.join(run, "checkpoints", "step_00000020", "COMPLETE"))
    # Every ZeRO stage logs the same pre-clip gradient norm (ZeRO-0 fp32: our own, DeepSpeed
    # keeps none there), and it is a real norm, not a placeholder.
    norms, ref_norms = grad_norms(run), grad_norms(zero_runs[0])
    assert sorted(norms) == list(range(1, 21)) and all(0.0 < n < 1e3 for n in norms.values()), norms
    for s in norms:
        assert norms[s] == pytest.approx(ref_norms[s], rel=1e-3), (z, s)


def test_run_folder_matches_design_and_loss_falls(zero_runs):
    run = zero_runs[1]
    assert sorted(p for p in os.listdir(run) if not p.startswith(".")) == ["checkpoints", "config.yaml",
                                                                          "metrics.jsonl", "plots", "summary.md"]
    recs = read_metrics(run)
    step = [r for r in recs if "event" not in r]
    for key in ("step", "stage", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "aux_loss", "mfu",
                "moe/max_over_mean"):
        assert key in step[-1], key
    # Tokens count label positions; the last token of each document predicts nothing.
    assert 0.9 * 20 * 4 * 64 < step[-1]["tokens"] <= 20 * 4 * 64
    first, last = step[0]["loss"], sum(r["loss"] for r in step[-3:]) / 3
    assert last < first - 1.0, (first, last)
    evals = [r for r in recs if r.get("event") == "stage_end"]
    assert len(evals) == 1 and evals[0]["eval_loss"] < first
    assert load_config(os.path.join(run, "config.yaml")).model.max_position_embeddings == 64
    # Only the newest keep_last=2 complete checkpoints remain.
    tags = sorted(d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith("step_"))
    assert tags == ["step_00000010", "step_00000020"]


def test_resume_never_refuses_to_overwrite(zero_runs, tiny_data, capsys):
    from scripts_train import main
    run = zero_runs[2]
    before = read_metrics(run)
    rc = main(["--config", DEFAULT, "--run-dir", run, "--resume", "never"] + sets(tiny_overrides(tiny_data)))
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert read_metrics(run) == before


def _dist_run(tmp_path, tiny_data, zero, nproc, grad_accum):
    run = str(tmp_path / f"z{zero}_p{nproc}")
    ov = tiny_overrides(tiny_data, steps=6, **{"deepspeed.zero_stage": zero, "train.micro_batch_size": 2,
                                              "train.grad_accum_steps": grad_accum})
    launcher = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(29600 + 10 * zero + nproc)]
    r = cli(launcher + [TRAIN, "--config", DEFAULT, "--run-dir", run] + sets(ov), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return step_losses(run)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_equal_one_process(tmp_path, tiny_data, zero):
    """Same global batch: 2 ranks x 2 sequences vs 1 rank x 2 sequences x 2 accumulation steps."""
    two = _dist_run(tmp_path, tiny_data, zero, nproc=2, grad_accum=1)
    one = _dist_run(tmp_path, tiny_data, zero, nproc=1, grad_accum=2)
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=2e-5), (s, one[s], two[s])


def _wait_for_step(run_dir, step, proc, timeout=240):
    """Poll metrics.jsonl until `step` is logged (the run is then mid-way between checkpoints)."""
    t = time.time()
    while True:
        try:
            if max(step_losses(run_dir), default=0) >= step:
                return
        except (OSError, ValueError):  # not there yet, or a line half written
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout, f"step {step} never logged"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill9_then_resume_is_bit_identical(tmp_path, tiny_data):
    ov = tiny_overrides(tiny_data, steps=80, **{"checkpoint.every_steps": 20})
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    r = cli([sys.executable, TRAIN, "--config", DEFAULT, "--run-dir", ref_dir] + sets(ov), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, TRAIN, "--config", DEFAULT, "--run-dir", run_dir] + sets(ov),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_step(run_dir, 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(step_losses(run_dir))
    assert killed_at < 80  # really killed mid-run
    r = cli([sys.executable, TRAIN, "--config", DEFAULT, "--run-dir", run_dir] + sets(ov), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, resumed = step_losses(ref_dir), step_losses(run_dir)
    assert sorted(resumed) == list(range(1, 81))
    for s in range(21, 81):
        assert resumed[s] == ref[s], (s, ref[s], resumed[s])  # bit for bit


TWO_STAGES = "[{name: short, seq_len: 32, steps: 10}, {name: long, seq_len: 128, steps: 12, warmup_steps: 3, " \
             "rope: {type: yarn, factor: 4.0}}]"


def test_resume_inside_stage_two_is_exact(tiny_data, tmp_path):
    """Stop at step 17 (5 steps into stage 2, checkpoint at 15), resume, compare."""
    ov = tiny_overrides(tiny_data, **{"stages": TWO_STAGES, "checkpoint.every_steps": 5})
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train(load_config(DEFAULT, ov), full, resume="never")
    # A crash after step 17: run to 17, then drop the final checkpoint it wrote.
    train(load_config(DEFAULT, ov + ["train.max_steps=17"]), cut, resume="never")
    import shutil
    shutil.rmtree(os.path.join(cut, "checkpoints", "step_00000017"))
    state = train(load_config(DEFAULT, ov), cut, resume="auto")
    assert state.step == 22 and state.stage == 1
    a, b = step_losses(full), step_losses(cut)
    assert sorted(b) == list(range(1, 23))
    for s in range(16, 23):
        assert a[s] == b[s], (s, a[s], b[s])
    recs = [r for r in read_metrics(full) if "event" not in r]
    assert [r["stage"] for r in recs] == ["short"] * 10 + ["long"] * 12
    assert recs[0]["seq_len"] == 32 and recs[-1]["seq_len"] == 128
    # Tokens per step stay constant across stages (micro-batch 4 x 32 -> 1 x 128).
    per_step = [b["tokens"] - a["tokens"] for a, b in zip(recs, recs[1:])]
    assert all(0.9 * 128 < t <= 128 for t in per_step), per_step
    # Stage 2 re-warms up over 3 steps to the peak LR, then decays.
    lrs = [r["lr"] for r in recs[10:]]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(3e-3) and lrs[-1] < lrs[2]


def test_wandb_offline_run_id_survives_resume(tiny_data, tmp_path, monkeypatch):
    """No API key: mode online falls back to offline; the resumed run reuses the W&B id."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    run = str(tmp_path / "run")
    ov = tiny_overrides(tiny_data, steps=4, **{"logging.wandb.mode": "online", "checkpoint.every_steps": 2})
    train(load_config(DEFAULT, ov + ["train.max_steps=2"]), run, resume="never")
    first = ckpt_client(run)["wandb_id"]
    train(load_config(DEFAULT, ov), run, resume="auto")
    assert ckpt_client(run)["wandb_id"] == first and first
    offline = [d for d in os.listdir(os.path.join(run, "wandb")) if d.startswith("offline-run-")]
    assert offline and all(d.endswith(first) for d in offline), offline


def ckpt_client(run):
    from moetrain import checkpoint
    return checkpoint.read_client_state(checkpoint.newest_complete(os.path.join(run, "checkpoints")))
