"""Two trials of scripts/stress_faults.py: SIGKILL inside a checkpoint save, relaunch,
and the continuation equals an uninterrupted run bit for bit (losses and final weights)."""
import importlib.util
import os

import pytest
from train_helpers import ROOT, tiny_overrides


def _stress_faults():
    spec = importlib.util.spec_from_file_location("stress_faults", os.path.join(ROOT, "scripts", "stress_faults.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_two_kill_trials_inside_saves_survive_bit_identical(tiny_data, tmp_path, capsys):
    sf = _stress_faults()
    data = [s for s in tiny_overrides(tiny_data) if s.split("=")[0] in ("data.dir", "data.recipe", "model.vocab_size")]
    args = ["--trials", "2", "--steps", "8", "--every", "2", "--max-kills", "1", "--mode", "save", "--pause", "0.4",
            "--seed", "3", "--out", str(tmp_path / "stress"), "--json", str(tmp_path / "stress.json")]
    summary = sf.main(args + [x for s in data for x in ("--set", s)])
    # both kills landed while a save was paused inside one of its phases
    assert summary["kills_landed"] == summary["kills_in_saves"] == 2
    assert summary["trials"] == summary["survived"] == summary["bit_identical"] == 2, summary
    assert summary["steps_lost_max"] <= 2  # never more than one checkpoint interval
    out = capsys.readouterr().out
    assert "trials=2 survived=2 bit_identical=2" in out
