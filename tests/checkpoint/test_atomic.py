"""Atomic checkpoints: temporary names renamed into place, COMPLETE last, --resume auto
skipping a broken newest checkpoint, and a full disk during a save."""
import errno
import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch

TRAIN_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train")
sys.path.insert(0, TRAIN_TESTS)
sys.path.insert(0, os.path.dirname(TRAIN_TESTS))
from train_helpers import ROOT, tiny_overrides  # noqa: E402
from scripts_train import main  # noqa: E402

from moetrain import checkpoint as ckpt  # noqa: E402
from moetrain.checkpoint import layout, store  # noqa: E402

_spec = importlib.util.spec_from_file_location("atomic_train_conftest", os.path.join(TRAIN_TESTS, "conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
tiny_data = _conftest.tiny_data  # the session corpus fixture of tests/train

DEFAULT = os.path.join(ROOT, "configs", "default.yaml")


def run(run_dir, data, steps=20, **extra):
    args = ["--config", DEFAULT, "--run-dir", str(run_dir)]
    for ov in tiny_overrides(data, steps=steps, **extra):
        args += ["--set", ov]
    return main(args)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in recs if "event" not in r}


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """20 uninterrupted steps, checkpoints at 10 and 20."""
    d = tmp_path_factory.mktemp("ref")
    assert run(d, tiny_data) == 0
    return str(d)


def test_save_renames_a_temporary_folder_and_writes_the_marker_last(tiny_data, tmp_path, monkeypatch, reference):
    renames, ds_tags = [], []
    real_replace, real_save = os.replace, store._write_rank_files

    def spy_replace(src, dst):
        renames.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    def spy_write(engine, root, tmp_tag, *a):
        ds_tags.append(tmp_tag)
        assert not os.path.exists(os.path.join(root, tmp_tag.split(layout.TMP_MARK)[0]))  # final name unused yet
        real_save(engine, root, tmp_tag, *a)

    monkeypatch.setattr(store.os, "replace", spy_replace)
    monkeypatch.setattr(store, "_write_rank_files", spy_write)
    assert run(tmp_path, tiny_data) == 0
    assert ds_tags == [f"step_00000010.tmp-{os.getpid()}", f"step_00000020.tmp-{os.getpid()}"]
    for step in (10, 20):
        final = os.path.join(tmp_path, "checkpoints", layout.tag_for(step))
        mine = [i for i, (_, dst) in enumerate(renames) if dst.startswith(final)]
        folder = renames.index((final + layout.TMP_MARK + str(os.getpid()), final))
        marker = renames.index(next(r for r in renames if r[1] == os.path.join(final, layout.MARKER)))
        assert max(i for i in mine) == marker and folder == marker - 1  # rename, then the marker, last
        for name in ("client_state.json", "rank0.json", "rank0_torch_rng.pt"):
            assert any(dst.endswith(name) and layout.TMP_MARK in src for src, dst in renames)
    leftovers = [p for _, _, files in os.walk(tmp_path) for p in files if layout.TMP_MARK in p]
    assert not leftovers and not [d for d in os.listdir(tmp_path / "checkpoints") if layout.is_tmp(d)]
    assert losses(str(tmp_path)) == losses(reference)  # the save path changes no numbers


def test_leftovers_of_a_killed_save_are_never_resumed_and_get_cleared(tiny_data, tmp_path, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    cks = tmp_path / "checkpoints"
    shutil.copytree(cks / "step_00000020", cks / "step_00000030.tmp-999")   # killed mid-save
    shutil.copytree(cks / "step_00000020", cks / "step_00000040")           # killed between rename and marker
    os.remove(cks / "step_00000040" / layout.MARKER)
    assert ckpt.prepare_run_dir(str(tmp_path), "auto", False, 0) == str(cks / "step_00000020")
    assert run(tmp_path, tiny_data, steps=30) == 0
    assert sorted(d for d in os.listdir(cks) if d.startswith("step_")) == ["step_00000020", "step_00000030"]


@pytest.mark.parametrize("damage", ["truncated_pt", "missing_rank_file", "bad_client_state"])
def test_resume_auto_falls_back_to_the_previous_complete_checkpoint(tiny_data, tmp_path, reference, damage,
                                                                    capfd):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    newest = tmp_path / "checkpoints" / "step_00000020"
    if damage == "truncated_pt":
        path = newest / layout.DS_MODEL_FILE
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "missing_rank_file":
        os.remove(newest / "rank0.json")
    else:
        (newest / "client_state.json").write_text('{"step": 20, "world')
    assert run(tmp_path, tiny_data) == 0  # the same 20-step schedule: steps 11-20 are redone
    err = capfd.readouterr().err
    assert f"checkpoint {newest} is unreadable" in err and "falling back to" in err and "step_00000010" in err
    assert losses(str(tmp_path)) == losses(reference)  # redone from step 10, bit for bit


def test_explicit_resume_of_a_broken_checkpoint_is_refused(tiny_data, tmp_path, reference, capsys):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    newest = tmp_path / "checkpoints" / "step_00000020"
    (newest / "rank0_torch_rng.pt").write_bytes(b"not a zip")
    args = ["--resume", str(newest)]
    rc = main(["--config", DEFAULT, "--run-dir", str(tmp_path), *args]
              + [x for ov in tiny_overrides(tiny_data, steps=30) for x in ("--set", ov)])
    assert rc == 2 and "cannot be loaded" in capsys.readouterr().err


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch, reference,
                                                               capsys):
    real = torch.save

    def full_disk(obj, f, *a, **kw):
        name = f if isinstance(f, str) else getattr(f, "name", "")
        if "step_00000020" in str(name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    assert run(tmp_path, tiny_data) == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = [ln for ln in err if ln.startswith("error:")]
    assert len(line) == 1 and "no space left" in line[0] and "step_00000020" in line[0], err[-5:]
    assert "step_00000010" in line[0]  # names the checkpoint that is still there
    cks = tmp_path / "checkpoints"
    assert sorted(d for d in os.listdir(cks) if d.startswith("step_")) == ["step_00000010"] and ckpt.checkpoint_problem(str(cks / "step_00000010")) is None

    monkeypatch.setattr(torch, "save", real)  # space freed: the same command resumes from step 10
    assert run(tmp_path, tiny_data) == 0
    assert losses(str(tmp_path)) == losses(reference)
