"""Fault-tolerance guards: preemption by SIGTERM, hostile pickles refused by every loader."""
import os
import pickle
import shutil
import signal
import subprocess
import sys

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


def test_sigterm_saves_at_the_current_step_exits_0_and_resumes_bit_identical(reference, tmp_path):
    ref_dir, ov = reference
    run = str(tmp_path / "preempted")
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, TRAIN, "--config", DEFAULT, "--run-dir", run] + sets(ov),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 25, proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err[-3000:]
    stopped = max(step_losses(run))
    assert 25 <= stopped < 40  # stopped mid-run, between the periodic checkpoints
    assert f"preempted by SIGTERM at step {stopped}; checkpoint saved at step {stopped}" in err
    newest = ckpt.RunDir(run).newest_complete()
    assert newest == ckpt.RunDir(run).checkpoint(stopped) and ckpt.checkpoint_problem(newest) is None
    assert ckpt.read_client_state(newest)["step"] == stopped

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


# --------------------------------------------------------------------------- hostile checkpoints
class _CreatesFile:
    """Unpickling this runs open(path, "w"): what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture()
def hostile_run(reference, tmp_path):
    """A copy of the reference run with a file-creating pickle planted in every .pt of
    its newest checkpoint; returns (run dir, the file the pickle would create)."""
    run = str(tmp_path / "hostile")
    shutil.copytree(reference[0], run)
    canary = str(tmp_path / "pwned")
    pickle.loads(pickle.dumps(_CreatesFile(str(tmp_path / "live"))))  # the payload really works
    assert os.path.exists(tmp_path / "live")
    newest = ckpt.RunDir(run).newest_complete()
    planted = [f for f in os.listdir(newest) if f.endswith(".pt")]
    assert len(planted) >= 3  # model, optimizer partition, torch RNG
    for f in planted:
        torch.save({"module": _CreatesFile(canary), "optimizer_state_dict": _CreatesFile(canary)},
                   os.path.join(newest, f))
    return run, canary


def test_resume_refuses_a_hostile_checkpoint(hostile_run, reference):
    run, canary = hostile_run
    for resume in ("auto", ckpt.RunDir(run).newest_complete()):
        r = cli([sys.executable, TRAIN, "--config", DEFAULT, "--run-dir", run, "--resume", resume]
                + sets(reference[1]), timeout=400)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and "refusing to load" in errors[0], r.stderr[-2000:]
        assert not os.path.exists(canary)


def test_load_model_export_eval_and_init_from_refuse_a_hostile_checkpoint(hostile_run, reference, tmp_path):
    import moetrain
    run, canary = hostile_run
    with pytest.raises(ValueError, match="refusing to load"):
        moetrain.load_model(run)
    for script, args in (("export.py", ["--checkpoint", run, "--out", str(tmp_path / "hf")]),
                         ("eval_long.py", ["--model", run, "--lengths", "64", "--out", str(tmp_path / "ev")])):
        r = cli([sys.executable, os.path.join(ROOT, "scripts", script), *args], timeout=300)
        assert r.returncode == 2 and "refusing to load" in r.stderr, (script, r.stderr[-2000:])
    warm = str(tmp_path / "warm")
    r = cli([sys.executable, TRAIN, "--config", DEFAULT, "--run-dir", warm, "--resume", "never"]
            + sets(reference[1] + [f"model.init_from={run}"]), timeout=400)
    assert r.returncode == 2 and "refusing to load" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(canary)
