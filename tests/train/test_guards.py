"""Fault-tolerance guards: preemption by SIGTERM (also signalled again inside the final save),
and a NaN/Inf on one rank of two skipping the same update on both. Hostile pickles:
tests/checkpoint/test_untrusted_pickles.py; loss spikes: test_spike.py."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import DEFAULT, ROOT, TRAIN, _wait_for_step, cli, read_metrics, sets, step_losses
from train_helpers import tiny_overrides

from moetrain import checkpoint as ckpt


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """40 uninterrupted steps (checkpoints at 20 and 40), launched as the tests launch."""
    run = str(tmp_path_factory.mktemp("guards_ref"))
    ov = tiny_overrides(tiny_data, steps=40, **{"checkpoint.every_steps": 20})
    r = cli([sys.executable, TRAIN, "--config", DEFAULT, "--run-dir", run] + sets(ov), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, ov


def _stress_faults():
    """scripts/stress_faults.py as a module: its training child pauses inside each save phase."""
    spec = importlib.util.spec_from_file_location("stress_faults", os.path.join(ROOT, "scripts", "stress_faults.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _wait_for_flag(flag_dir, phase, min_step, proc, timeout=240):
    t = time.time()
    while True:
        names = os.listdir(flag_dir) if os.path.isdir(flag_dir) else []
        if any(n.split("-")[-2] == phase and int(n.split("-")[-1]) >= min_step for n in names):
            return
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout, f"no save reached {phase}"
        time.sleep(0.02)


def test_sigterm_saves_at_the_current_step_exits_0_and_resumes_bit_identical(reference, tmp_path):
    """SIGTERM mid-run: exit 0, a complete checkpoint at that step, resumed losses equal the
    uninterrupted run bit for bit; a second SIGTERM and a SIGINT inside that final save
    (paused between its phases) are ignored and corrupt nothing."""
    ref_dir, ov = reference
    run, flags = str(tmp_path / "preempted"), str(tmp_path / "flags")
    sf = _stress_faults()
    proc = subprocess.Popen(sf.child_command(run, DEFAULT, ov, flags, pause=1.0), cwd=ROOT, env=sf.child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 25, proc)
    proc.send_signal(signal.SIGTERM)
    _wait_for_flag(flags, "written", 25, proc)   # the final save: every file in its temporary folder
    proc.send_signal(signal.SIGTERM)
    _wait_for_flag(flags, "renamed", 25, proc)   # renamed into place, the marker not yet written
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM again: ignored until the checkpoint is written" in err
    assert "received SIGINT again: ignored until the checkpoint is written" in err
    stopped = max(step_losses(run))
    assert 25 <= stopped < 40  # stopped mid-run, between the periodic checkpoints
    assert f"preempted by SIGTERM at step {stopped}; checkpoint saved at step {stopped}" in err
    newest = ckpt.RunDir(run).newest_complete()
    assert newest == ckpt.RunDir(run).checkpoint(stopped) and ckpt.checkpoint_problem(newest) is None
    assert ckpt.read_client_state(newest)["step"] == stopped
    tags = sorted(d for d in os.listdir(ckpt.RunDir(run).checkpoints) if d.startswith("step_"))
    assert tags == ["step_00000020", os.path.basename(newest)]  # no half-written folder left

    r = cli([sys.executable, TRAIN, "--config", DEFAULT, "--run-dir", run] + sets(ov), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, resumed = step_losses(ref_dir), step_losses(run)
    assert sorted(resumed) == list(range(1, 41))
    assert [resumed[s] for s in range(1, 41)] == [ref[s] for s in range(1, 41)]  # bit for bit
    assert len([r for r in read_metrics(run) if "event" not in r]) == 40  # one record per step


def test_a_second_signal_is_ignored_with_one_line_and_handlers_are_restored(capsys):
    from types import SimpleNamespace

    from moetrain.train.guards import PreemptionCallback
    before = signal.getsignal(signal.SIGTERM)
    cb, trainer = PreemptionCallback(), SimpleNamespace(world=1)
    cb.on_train_start(trainer)
    assert signal.getsignal(signal.SIGTERM) == cb._handle
    cb._handle(signal.SIGTERM, None)
    cb._handle(signal.SIGINT, None)  # e.g. during the final save
    assert cb.received == signal.SIGTERM and cb.agreed_signal(trainer) == signal.SIGTERM
    err = capsys.readouterr().err.splitlines()
    assert err == ["received SIGTERM: stopping after this step and saving a checkpoint",
                   "received SIGINT again: ignored until the checkpoint is written"]
    cb.on_train_end(trainer)
    assert signal.getsignal(signal.SIGTERM) == before




# --------------------------------------------------------------------------- NaN on one rank of two
@pytest.mark.dist
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nan_on_one_rank_of_two_skips_the_same_update_on_both(tiny_data, tmp_path, where):
    """Rank 1 alone sees a NaN loss (ZeRO-1) or an Inf gradient (ZeRO-0) at step 3: both
    ranks skip that update, train on afterwards, and end with the same weights."""
    from guard_workers import free_port, nan_on_one_rank
    ov = tiny_overrides(tiny_data, steps=5, **{"train.micro_batch_size": 2, "checkpoint.every_steps": 100,
                                              "deepspeed.zero_stage": 1 if where == "loss" else 0})
    run, out = str(tmp_path / "run"), str(tmp_path)
    torch.multiprocessing.spawn(nan_on_one_rank, args=(2, free_port(), ov, run, out, where), nprocs=2, join=True)
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
    for r in ranks:
        assert r["step"] == 5
        assert r["skipped"] == {"1": False, "2": False, "3": True, "4": False, "5": False}
        assert r["moved"] == {"1": True, "2": True, "3": False, "4": True, "5": True}
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the ranks never diverged
    recs = [r for r in read_metrics(run) if "event" not in r]
    assert [r["update_skipped"] for r in recs] == [False, False, True, False, False]
    assert [r["nonfinite"] for r in recs] == [0, 0, 1, 1, 1]
