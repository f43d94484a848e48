"""moetrain.checkpoint: which stage a checkpoint is applied in, no pickles run while loading
one, and our ZeRO merge equal to DeepSpeed's zero_to_fp32 (on real 2-process checkpoints
written by tests/export/make_checkpoints.py)."""
import contextlib
import importlib.util
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import moetrain
from moetrain import checkpoint as ckpt

EXPORT_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "export")
MAKE_CHECKPOINTS = os.path.join(EXPORT_TESTS, "make_checkpoints.py")
SPECS = ["mixtral_z2:2:1:none", "qwen3_z3:3:1:yarn"]


def _export_helpers():
    # by path, under its own name: tests/export is not a package and its conftest is not ours
    spec = importlib.util.spec_from_file_location("checkpoint_tests_export_helpers",
                                                  os.path.join(EXPORT_TESTS, "export_helpers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


helpers = _export_helpers()


# --------------------------------------------------------------------------- stage_of
def _token_staged_config():
    """Two stages sized in tokens, so their step counts depend on the world size."""
    from moetrain.config import config_from_dict, to_dict
    d = to_dict(helpers.tiny_config("mixtral", rope="yarn"))
    d["stages"] = [{"name": "short", "seq_len": 16, "tokens": 16 * 2 * 40},
                   {"name": "long", "seq_len": 32, "tokens": 32 * 1 * 40, "rope": {"type": "yarn", "factor": 2.0}}]
    return config_from_dict(d)


def test_stage_of_takes_the_previous_stage_at_a_boundary_and_the_saved_world_size():
    from moetrain.train.schedule import plan_stages
    cfg = _token_staged_config()
    assert plan_stages(cfg, 4)[0].steps != plan_stages(cfg, 1)[0].steps  # else the world size proves nothing

    plan = ckpt.stage_of(cfg, {"stage": 1, "step_in_stage": 0, "world_size": 4})
    assert plan.name == "short" and plan.steps == plan_stages(cfg, 4)[0].steps == 10
    plan = ckpt.stage_of(cfg, {"stage": 1, "step_in_stage": 3, "world_size": 4})
    assert plan.name == "long" and plan.steps == plan_stages(cfg, 4)[1].steps
    assert ckpt.stage_of(cfg, {"stage": 0, "step_in_stage": 0, "world_size": 4}).name == "short"


def test_apply_stage_sets_rope_context_and_backend():
    from moetrain.model import build_model
    cfg = _token_staged_config()
    model = build_model(cfg.model)
    plan = ckpt.stage_of(cfg, {"stage": 1, "step_in_stage": 3, "world_size": 1})
    ckpt.apply_stage(model, plan, backend="reference")
    rope = model.rotary.rope
    assert (rope.name, rope.max_position_embeddings) == ("yarn", 32)
    assert ckpt.stage_rope(plan).original_max_position_embeddings == 16
    assert {layer.attn.backend for layer in model.layers} == {"reference"}
    ckpt.apply_stage(model, plan)  # no backend given: the stage's configured one
    assert {layer.attn.backend for layer in model.layers} == {plan.attention.backend}


# --------------------------------------------------------------------------- real checkpoints
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ckpt_runs")
    data_dir = helpers.make_data_dir(str(out / "prepared"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), MAKE_CHECKPOINTS, str(out), data_dir, *SPECS]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=EXPORT_TESTS)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return str(out)


class _CreatesFile:
    """Unpickling this runs open(path, "w"): what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.dist
@pytest.mark.parametrize("name,victim", [("mixtral_z2", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                         ("qwen3_z3", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                         ("mixtral_z2", "mp_rank_00_model_states.pt")])
def test_load_model_never_runs_a_pickle(runs, tmp_path, name, victim):
    run = str(tmp_path / name)
    shutil.copytree(os.path.join(runs, name), run)
    canary = str(tmp_path / "pwned")
    pickle.loads(pickle.dumps(_CreatesFile(str(tmp_path / "live"))))  # the payload does work when unpickled
    assert os.path.exists(tmp_path / "live")

    target = os.path.join(ckpt.resolve_checkpoint(run), victim)
    torch.save({"optimizer_state_dict": _CreatesFile(canary), "module": _CreatesFile(canary)}, target)
    with pytest.raises(ValueError, match="refusing to load"):
        moetrain.load_model(run)
    assert not os.path.exists(canary)


@pytest.mark.dist
@pytest.mark.parametrize("name", ["qwen3_z3", "mixtral_z2"])
def test_zero_merge_equals_deepspeeds_zero_to_fp32(runs, name):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt_dir = ckpt.resolve_checkpoint(os.path.join(runs, name))
    root, tag = os.path.split(ckpt_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
        want = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    got = ckpt.zero_state_dict(ckpt_dir)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
