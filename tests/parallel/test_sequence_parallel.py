"""DeepSpeed-Ulysses sequence parallelism (moetrain/parallel/sequence.py) on CPU over gloo.

- 2 processes, sp=2: loss, logits, router statistics and every gradient equal the
  unsharded model for full attention, sliding + sinks, MoBA, packed documents, GQA
  (KV heads split and replicated) and capacity mode.
- The trainer at sp=2 (2 processes) has the losses of one process on the same data;
  ZeRO-3 and expert parallelism compose; a kill -9 inside an sp=2 run resumes bit-identically.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sp_workers as workers  # noqa: E402

from moetrain.config import ConfigError, config_from_dict, validate  # noqa: E402
from moetrain.parallel.dims import ParallelDims  # noqa: E402
from moetrain.parallel.sequence import (SequenceShardedLoader, check_heads, check_resume_size,  # noqa: E402
                                        shard_batch)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_train_dir = os.path.join(os.path.dirname(HERE), "train")
tiny_data = _load("sp_train_conftest", os.path.join(_train_dir, "conftest.py")).tiny_data  # the shared corpus
_helpers = _load("sp_train_helpers", os.path.join(_train_dir, "train_helpers.py"))
ROOT, tiny_overrides = _helpers.ROOT, _helpers.tiny_overrides
DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
TRAIN = os.path.join(ROOT, "scripts", "train.py")


# --------------------------------------------------------------------------- exactness of the model
@pytest.mark.dist
def test_sp2_model_equals_unsharded():
    cases = [("full", 1, False, {}),                    # rows, 1 KV head replicated over 2 ranks
             ("full", 2, True, {}),                     # packed documents across the shard boundary
             ("sliding_sinks", 2, True, {}),
             ("moba", 1, True, {}),
             ("full", 2, False, {"capacity_factor": 1.0}),
             ("sliding_sinks", 1, True, {"backend": "chunked", "checkpoint": "full"})]
    workers.spawn(workers.equivalence, 2, cases)


@pytest.mark.dist
@pytest.mark.slow
def test_sp4_replicates_kv_heads_in_their_groups():
    """4 ranks, 4 query heads, 2 KV heads: each KV head is copied to the 2 ranks of its query heads."""
    workers.spawn(workers.equivalence, 4, [("full", 2, True, {}), ("sliding_sinks", 2, False, {})])


# --------------------------------------------------------------------------- pieces without processes
def test_shard_batch_cuts_contiguous_columns_with_global_positions():
    batch = workers.make_batch(packed=True, S=16)
    parts = [shard_batch(batch, r, 2) for r in range(2)]
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), batch[key])
    assert all(p["cu_seqlens"] is batch["cu_seqlens"] for p in parts)  # attention sees the whole sequence
    rows = dict(workers.make_batch(packed=False, S=8, B=3), position_ids=None)
    assert torch.equal(shard_batch(rows, 1, 2)["position_ids"], torch.arange(4, 8).expand(3, 4))
    with pytest.raises(ValueError, match="not divisible"):
        shard_batch(workers.make_batch(packed=False, S=9), 0, 2)


def test_sharded_loader_keeps_the_wrapped_loader_state():
    class Loader:
        seq_len = 8

        def __init__(self):
            self.slot = 0

        def next_batch(self):
            self.slot += 1
            return workers.make_batch(packed=False, S=8, seed=self.slot)

        def state_dict(self):
            return {"slot": self.slot}

        def load_state_dict(self, s):
            self.slot = s["slot"]

    a = SequenceShardedLoader(Loader(), 1, 2)
    a.next_batch()
    b = SequenceShardedLoader(Loader(), 1, 2)
    b.load_state_dict(a.state_dict())
    assert a.seq_len == 8 and torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])


def test_dims_and_config_errors_are_clear():
    d = ParallelDims(world=4, rank=3, ep=2, sp=2)
    assert (d.dp, d.dp_rank, d.sp_rank, d.zero_world, d.ep_rank) == (2, 1, 1, 4, 1)
    with pytest.raises(ValueError, match=r"size 4 \(deepspeed.sequence_parallel_size\) needs a multiple of 4"):
        ParallelDims(world=6, rank=0, sp=4)
    check_heads(8, 2, 4)  # KV heads replicated
    with pytest.raises(ValueError, match="n_heads=6 is not divisible"):
        check_heads(6, 6, 4)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        check_heads(12, 3, 2)

    def cfg(**kw):
        d = {"model": {"n_heads": 4, "n_kv_heads": 2}, "stages": [{"seq_len": 64, "steps": 1}],
             "deepspeed": {"sequence_parallel_size": 2}}
        for k, v in kw.items():
            d[k].update(v) if isinstance(v, dict) else d.__setitem__(k, v)
        return config_from_dict(d)

    validate(cfg(), world_size=2)
    check_resume_size(cfg(), {"config": {"deepspeed": {"sequence_parallel_size": 2}}}, "ck")
    with pytest.raises(ValueError, match="trained with deepspeed.sequence_parallel_size=1, this launch sets 2"):
        check_resume_size(cfg(), {"config": {"deepspeed": {"sequence_parallel_size": 1}}}, "ck")
    for bad, msg in [(dict(model={"n_heads": 6, "n_kv_heads": 6}), "n_heads=6"),
                     (dict(stages=[{"seq_len": 63, "steps": 1}]), r"stages\[0\].seq_len=63"),
                     (dict(deepspeed={"sequence_parallel_size": 3}), "world size 2 is not divisible"),
                     (dict(deepspeed={"sequence_parallel_size": 0}), "positive integer")]:
        with pytest.raises(ConfigError, match=msg):
            validate(cfg(**bad), world_size=2)


# --------------------------------------------------------------------------- training through the Trainer
def _cli_env():
    return dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def _sets(overrides):
    return [x for ov in overrides for x in ("--set", ov)]


def _cmd(nproc, run_dir, overrides):
    base = [TRAIN, "--config", DEFAULT, "--run-dir", run_dir] + _sets(overrides)
    if nproc == 1:
        return [sys.executable] + base
    port = str(workers.free_port())
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port] + base


def _train(nproc, run_dir, overrides):
    r = subprocess.run(_cmd(nproc, run_dir, overrides), capture_output=True, text=True, cwd=ROOT, env=_cli_env(),
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return _losses(run_dir)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _records(run_dir) if "event" not in r}


def _ov(tiny_data, steps=20, **extra):
    return tiny_overrides(tiny_data, steps=steps, **extra)


@pytest.fixture(scope="module")
def sp_runs(tiny_data, tmp_path_factory):
    """20 steps (packed documents, sliding + full layers, MoE, GQA, ZeRO-1) in one process and at sp=2."""
    out = {}
    for n in (1, 2):
        run = str(tmp_path_factory.mktemp(f"sp{n}"))
        _train(n, run, _ov(tiny_data, **{"deepspeed.sequence_parallel_size": n}))
        out[n] = run
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_sp2_training_has_the_losses_of_one_process(sp_runs):
    one, two = _records(sp_runs[1]), _records(sp_runs[2])
    steps = [r for r in one if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and a.get("event") == b.get("event")
        for key in ("loss", "lm_loss", "grad_norm", "eval_loss"):
            if a.get(key) is not None:
                assert abs(b[key] - a[key]) <= 1e-4 * abs(a[key]), (key, a["step"], a[key], b[key])
        assert a.get("tokens") == b.get("tokens")  # every label token counted once over the shards
    assert steps[-1]["loss"] < steps[0]["loss"]


@pytest.mark.dist
@pytest.mark.slow
def test_sp2_kill9_then_resume_is_bit_identical(sp_runs, tiny_data, tmp_path):
    run = str(tmp_path / "killed")
    proc = subprocess.Popen(_cmd(2, run, _ov(tiny_data, **{"deepspeed.sequence_parallel_size": 2})), cwd=ROOT,
                            env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    t = time.time()
    while max(_losses(run) if os.path.exists(os.path.join(run, "metrics.jsonl")) else {0: 0}, default=0) < 13:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t < 400, "step 13 never logged"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: a crash between checkpoints
    proc.wait()
    assert max(_losses(run)) < 20
    resumed = _train(2, run, _ov(tiny_data, **{"deepspeed.sequence_parallel_size": 2}))
    ref = _losses(sp_runs[2])
    assert sorted(resumed) == list(range(1, 21))
    for s in range(11, 21):
        assert resumed[s] == ref[s], (s, ref[s], resumed[s])  # bit for bit


@pytest.mark.dist
@pytest.mark.slow
def test_sp2_composes_with_zero3_and_expert_parallelism(sp_runs, tiny_data, tmp_path):
    """6 steps at sp=2 with ZeRO-3, and with ep=2 on the same two ranks: the one-process losses."""
    ref = _losses(sp_runs[1])
    for name, extra in [("z3", {"deepspeed.zero_stage": 3}), ("ep", {"model.moe.ep_size": 2})]:
        got = _train(2, str(tmp_path / name), _ov(tiny_data, steps=20, **{
            "deepspeed.sequence_parallel_size": 2, "train.max_steps": 6, **extra}))
        assert sorted(got) == list(range(1, 7))
        for s in got:
            assert abs(got[s] - ref[s]) <= 1e-4 * ref[s], (name, s, ref[s], got[s])
