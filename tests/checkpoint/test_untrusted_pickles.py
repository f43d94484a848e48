"""Untrusted files are never unpickled: a pickle that would run code, planted in every .pt
of a checkpoint folder, is refused by load_model, export, eval_long.py, model.init_from,
--resume (auto and PATH), DeepSpeed's own checkpoint loader as we call it and the
re-splitting loader (reshard.py), each with one clear error line, and nothing in it runs.
Configs are read with yaml.safe_load only."""
import hashlib
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

TRAIN_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train")
sys.path.insert(0, TRAIN_TESTS)
from train_helpers import ROOT, tiny_overrides  # noqa: E402

from moetrain import checkpoint as ckpt  # noqa: E402

_spec = importlib.util.spec_from_file_location("pickles_train_conftest", os.path.join(TRAIN_TESTS, "conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
tiny_data = _conftest.tiny_data  # the session corpus fixture of tests/train

DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
TRAIN = os.path.join(ROOT, "scripts", "train.py")


def cli(args, timeout=400):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def sets(overrides):
    return [x for ov in overrides for x in ("--set", ov)]


class _CreatesFile:
    """Unpickling this runs open(path, "w"): what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """4 steps, checkpoints at 2 and 4."""
    run = str(tmp_path_factory.mktemp("pickles_ref"))
    ov = tiny_overrides(tiny_data, steps=4, **{"checkpoint.every_steps": 2})
    r = cli([TRAIN, "--config", DEFAULT, "--run-dir", run] + sets(ov))
    assert r.returncode == 0, r.stderr[-3000:]
    return run, ov


def _snapshot(folder):
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture()
def hostile(trained, tmp_path):
    """A copy of the run with a file-creating pickle in every .pt of every checkpoint;
    returns (run dir, the file the pickle would create)."""
    run = str(tmp_path / "hostile")
    shutil.copytree(trained[0], run)
    canary = str(tmp_path / "pwned")
    pickle.loads(pickle.dumps(_CreatesFile(str(tmp_path / "live"))))  # the payload really works
    assert os.path.exists(tmp_path / "live")
    for tag in ckpt.list_complete(ckpt.RunDir(run).checkpoints):
        planted = [f for f in os.listdir(tag) if f.endswith(".pt")]
        assert len(planted) >= 3  # model, optimizer partition, torch RNG
        for f in planted:
            torch.save({"module": _CreatesFile(canary), "optimizer_state_dict": _CreatesFile(canary)},
                       os.path.join(tag, f))
    return run, canary


def _load_model(run, ov, tmp_path):
    import moetrain
    with pytest.raises(ValueError) as e:
        moetrain.load_model(run)
    return 2, f"error: {e.value}"


def _engine_loader(zero_stage):
    """ckpt.load past our pre-check (checkpoint_problem): the saved layout (ZeRO-1) goes
    through DeepSpeed's own engine.load_checkpoint, another one (ZeRO-0) through reshard.py."""
    def go(run, ov, tmp_path):
        from moetrain.compose import default_callbacks
        from moetrain.config import load_config
        from moetrain.train.trainer import Trainer
        cfg = load_config(DEFAULT, ov + [f"deepspeed.zero_stage={zero_stage}"])
        trainer = Trainer(cfg, str(tmp_path / "fresh"), default_callbacks(cfg), resume="never")
        with pytest.raises(ValueError) as e:
            ckpt.load(trainer.engine, ckpt.RunDir(run).newest_complete(), 0, 1)
        return 2, f"error: {e.value}"
    return go


def _script(name, *args):
    def go(run, ov, tmp_path):
        r = cli([os.path.join(ROOT, "scripts", name), *[a.format(run=run, tmp=tmp_path) for a in args]])
        return r.returncode, r.stderr
    return go


def _train(resume=None, init_from=False):
    def go(run, ov, tmp_path):
        if init_from:
            args = ["--run-dir", str(tmp_path / "warm"), "--resume", "never"]
            ov = ov + [f"model.init_from={run}"]
        else:
            args = ["--run-dir", run, "--resume", resume or ckpt.RunDir(run).newest_complete()]
        r = cli([TRAIN, "--config", DEFAULT, *args] + sets(ov))
        return r.returncode, r.stderr
    return go


PATHS = {
    "load_model": _load_model,
    "export": _script("export.py", "--checkpoint", "{run}", "--out", "{tmp}/hf"),
    "eval_long": _script("eval_long.py", "--model", "{run}", "--lengths", "64", "--out", "{tmp}/ev"),
    "init_from": _train(init_from=True),
    "resume_auto": _train(resume="auto"),
    "resume_path": _train(),
    "deepspeed_loader": _engine_loader(1),
    "reshard_loader": _engine_loader(0),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_loader_refuses_a_planted_pickle_with_one_line(hostile, trained, tmp_path, path):
    run, canary = hostile
    before = _snapshot(run)
    rc, err = PATHS[path](run, trained[1], tmp_path)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, (path, rc, err[-3000:])
    assert "refusing to load" in errors[0] and ".pt" in errors[0], errors[0]
    assert "Traceback" not in err
    assert not os.path.exists(canary)   # nothing in the pickle ran
    assert _snapshot(run) == before     # nothing in the run folder was touched


def test_a_config_tag_that_would_run_code_is_refused(tmp_path):
    from moetrain.config import ConfigError, load_config
    canary = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"seed: !!python/object/apply:os.system ['touch {canary}']\n")
    with pytest.raises(ConfigError):
        load_config(str(bad))
    r = cli([TRAIN, "--config", str(bad), "--dry-run"])
    assert r.returncode == 2 and len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
    tag = f"seed=!!python/object/apply:os.system ['touch {canary}']"
    r = cli([TRAIN, "--config", DEFAULT, "--dry-run", "--set", tag])
    assert r.returncode == 2 and len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert not canary.exists()
