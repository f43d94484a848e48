"""Muon through the real trainer and DeepSpeed: resume is bit-identical, EP=2 == EP=1."""
import os

from optim_dist_workers import muon_ep_matches_ep1
from moe_dist_workers import spawn
from train_helpers import ROOT, tiny_overrides

from moetrain.compose import train
from moetrain.config import load_config

DEFAULT = os.path.join(ROOT, "configs", "default.yaml")


def test_muon_resume_is_bit_identical(tiny_data, tmp_path):
    from test_train import step_losses
    ov = tiny_overrides(tiny_data, steps=8, **{"optim.name": "muon", "optim.schedule": "wsd",
                                                "deepspeed.zero_stage": 0, "checkpoint.every_steps": 4,
                                                "train.max_steps": 4})
    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    train(load_config(DEFAULT, ov), run, resume="never")
    state = train(load_config(DEFAULT, ov[:-1] + ["train.max_steps=8"]), run, resume="auto")
    assert state.step == 8
    train(load_config(DEFAULT, ov[:-1] + ["train.max_steps=8"]), ref, resume="never")
    losses, ref_losses = step_losses(run), step_losses(ref)
    assert len(ref_losses) == 8 and losses == ref_losses  # optimizer state restored exactly
    assert ref_losses[8] < ref_losses[1]


def test_muon_ep2_matches_ep1():
    spawn(muon_ep_matches_ep1, 2, 2)
