"""Resume on another layout (moetrain/checkpoint/reshard.py) and train.global_batch_size.

The end-to-end tests train a tiny MoE (fp32, CPU, gloo) at a fixed global batch of 4
sequences (micro-batch 2: 1 process accumulates 2 micro-batches, 2 processes 1 each, on the
same global batches: the loader's position is global) and compare every step's loss with an
uninterrupted 1-process run at rtol 1e-5. Why 1e-5: the layouts add the same per-micro-batch
gradients in another order (accumulation vs all-reduce), a few fp32 ulps (measured: <= 4e-8);
re-splitting without the Adam moments moves the losses after the resume by ~7e-4.
"""
import importlib.util
import json
import os
import shutil
import sys
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reshard_workers import DEFAULT, overrides, run, step_losses  # noqa: E402

from moetrain.checkpoint import reshard  # noqa: E402
from moetrain.config import ConfigError, load_config  # noqa: E402

_spec = importlib.util.spec_from_file_location("_reshard_train_conftest",
                                               os.path.join(os.path.dirname(HERE), "train", "conftest.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
tiny_data = _mod.tiny_data

STEPS, CUT, RTOL = 6, 3, 1e-5


def _client(ckpt_dir):
    with open(os.path.join(ckpt_dir, "client_state.json")) as f:
        return json.load(f)


def _ckpt(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


@pytest.fixture(scope="module")
def ref(tiny_data, tmp_path_factory):
    """Uninterrupted: 1 process, ZeRO-1 (the default config's), checkpoints at steps 3 and 6."""
    run_dir = str(tmp_path_factory.mktemp("reshard") / "ref")
    run(1, overrides(tiny_data, STEPS, **{"deepspeed.zero_stage": 1, "checkpoint.every_steps": CUT}), run_dir)
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return run_dir, losses


def _from_ref_checkpoint(ref_dir, dst):
    """The reference run as a run killed right after its step-3 checkpoint."""
    shutil.copytree(ref_dir, dst)
    shutil.rmtree(_ckpt(dst, STEPS))
    return dst


def _assert_matches(losses, ref_losses):
    assert sorted(losses) == sorted(ref_losses)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=RTOL), (step, losses[step], loss)


@pytest.mark.slow
def test_zero1_resume_1_to_2_processes(ref, tmp_path):
    ref_dir, ref_losses = ref
    run_dir = _from_ref_checkpoint(ref_dir, str(tmp_path / "run"))
    run(2, overrides(tiny_data_dir(ref_dir), STEPS, **{"deepspeed.zero_stage": 1}), run_dir)
    assert _client(_ckpt(run_dir, CUT))["world_size"] == 1 and _client(_ckpt(run_dir, STEPS))["world_size"] == 2
    _assert_matches(step_losses(run_dir), ref_losses)


@pytest.mark.slow
def test_zero1_resume_2_to_1_processes(ref, tmp_path):
    ref_dir, ref_losses = ref
    run_dir, data = str(tmp_path / "run"), tiny_data_dir(ref_dir)
    run(2, overrides(data, STEPS, **{"deepspeed.zero_stage": 1, "train.max_steps": CUT}), run_dir)
    run(1, overrides(data, STEPS, **{"deepspeed.zero_stage": 1}), run_dir)
    assert _client(_ckpt(run_dir, CUT))["world_size"] == 2 and _client(_ckpt(run_dir, STEPS))["world_size"] == 1
    _assert_matches(step_losses(run_dir), ref_losses)


@pytest.mark.slow
def test_zero0_ep2_resumes_on_1_process_ep1(ref, tmp_path):
    """ZeRO-0 under expert parallelism: each EP rank's optimizer file holds its experts' Adam
    state; they are joined and the whole experts go to the single process."""
    ref_dir, ref_losses = ref
    run_dir, data = str(tmp_path / "run"), tiny_data_dir(ref_dir)
    run(2, overrides(data, STEPS, **{"deepspeed.zero_stage": 0, "model.moe.ep_size": 2, "train.max_steps": CUT}),
        run_dir)
    assert os.path.exists(os.path.join(_ckpt(run_dir, CUT), "experts_ep1.pt"))
    run(1, overrides(data, STEPS, **{"deepspeed.zero_stage": 0, "model.moe.ep_size": 1}), run_dir)
    _assert_matches(step_losses(run_dir), ref_losses)


@pytest.mark.slow
def test_muon_zero1_resumes_as_zero2_ep2_on_2_processes(ref, tmp_path):
    """World size, ZeRO stage and ep_size change at once, under Muon (momentum in the Muon
    groups, Adam moments in the others): a 1-process ZeRO-1 checkpoint re-split into 2 processes
    at ZeRO-2 with EP=2, each rank taking its half of the experts and its partitions
    (moetrain/optim/muon_zero.py gathers each matrix for Newton-Schulz)."""
    ref_dir, data = str(tmp_path / "ref"), tiny_data_dir(ref[0])
    muon = {"optim.name": "muon", "checkpoint.every_steps": CUT}
    run(1, overrides(data, STEPS, **{"deepspeed.zero_stage": 1, **muon}), ref_dir)
    run_dir = _from_ref_checkpoint(ref_dir, str(tmp_path / "run"))
    run(2, overrides(data, STEPS, **{"deepspeed.zero_stage": 2, "model.moe.ep_size": 2, **muon}), run_dir)
    assert _client(_ckpt(run_dir, STEPS))["world_size"] == 2
    _assert_matches(step_losses(run_dir), step_losses(ref_dir))


def tiny_data_dir(ref_dir):
    """The data folder the reference run used (from its resolved config)."""
    return _client(_ckpt(ref_dir, CUT))["config"]["data"]["dir"]


# --------------------------------------------------------------------------- per-rank state, refusals
@pytest.mark.slow
def test_new_rank_state_and_global_batch_note(ref):
    ref_dir, _ = ref
    ckpt_dir = _ckpt(ref_dir, CUT)
    client = _client(ckpt_dir)
    assert client[reshard.OPTIM_NAMES] and all(client[reshard.OPTIM_NAMES])
    kept, kept_rng = reshard.rank_state(ckpt_dir, client, 0)
    new, new_rng = reshard.rank_state(ckpt_dir, client, 1)
    assert new["loader"] == kept["loader"]  # the data position is global
    assert new["rng"] != kept["rng"] and not (new_rng == kept_rng).all()
    again, again_rng = reshard.rank_state(ckpt_dir, client, 1)
    assert again["rng"] == new["rng"] and (again_rng == new_rng).all()  # deterministic
    data = tiny_data_dir(ref_dir)
    assert reshard.global_batch_note(client, load_config(DEFAULT, overrides(data, STEPS)), 2) is None
    fixed_accum = overrides(data, STEPS, **{"train.global_batch_size": "null", "train.grad_accum_steps": 2})
    note = reshard.global_batch_note(client, load_config(DEFAULT, fixed_accum), 2)
    assert "from 4 to 8 sequences" in note and "train.global_batch_size=4" in note


def test_zero3_layout_change_refuses_in_one_line():
    engine = types.SimpleNamespace(optimizer=object())
    old, new = {"world": 1, "zero": 3, "ep": 1}, {"world": 2, "zero": 3, "ep": 1}
    with pytest.raises(ValueError) as e:
        reshard._check_writable(engine, old, new, "ckpt")
    msg = str(e.value)
    assert "\n" not in msg and "1 process (ZeRO-3" in msg and "2 processes (ZeRO-3" in msg
    assert "relaunch with the checkpoint's layout: 1 process(es), deepspeed.zero_stage=3" in msg


# --------------------------------------------------------------------------- train.global_batch_size
def test_global_batch_derives_accumulation():
    from moetrain.config import grad_accum_for
    from moetrain.parallel.engine import derive_deepspeed_config
    from moetrain.train.schedule import plan_stages
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8"])
    assert [grad_accum_for(cfg.train, dp) for dp in (1, 2, 4)] == [4, 2, 1]
    assert [plan_stages(cfg, dp)[0].grad_accum_steps for dp in (1, 2, 4)] == [4, 2, 1]
    ds = derive_deepspeed_config(cfg, 2)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 8
    plain = load_config(None, ["train.micro_batch_size=2"])
    assert plan_stages(plain, 4)[0].grad_accum_steps == 1  # neither key: no accumulation
    both = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8", "train.grad_accum_steps=2"])
    assert grad_accum_for(both.train, 2) == 2  # consistent at 2 ranks


@pytest.mark.parametrize("over,world,fragment", [
    (["train.micro_batch_size=3", "train.global_batch_size=8"], 1, "not divisible by micro_batch_size 3"),
    (["train.micro_batch_size=2", "train.global_batch_size=6"], 2,
     "train.global_batch_size=6 is not divisible by micro_batch_size 2 x data-parallel size 2 = 4"),
    (["train.micro_batch_size=2", "train.global_batch_size=8", "train.grad_accum_steps=2"], 4,
     "drop train.grad_accum_steps (it is derived from the global batch: 1 here)"),
    (["train.global_batch_size=0"], 1, "train.global_batch_size=0 must be positive"),
])
def test_global_batch_errors_are_one_line(over, world, fragment):
    from moetrain.config import config_from_dict, validate
    with pytest.raises(ConfigError) as e:
        validate(config_from_dict({}, over), world)
    assert fragment in str(e.value) and "\n" not in str(e.value)
