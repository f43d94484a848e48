"""export.enabled: the trainer writes RUN_DIR/export/ (verified) at the end of training."""
import json
import os
import random
import subprocess
import sys

import pytest
from export_helpers import ROOT, tiny_config

from moetrain.checkpoint import final_stage


def _train_with_export(tmp_path, data_dir, launcher):
    run = str(tmp_path / "run")
    sets = {"model.vocab_size": 384, "model.hidden_size": 32, "model.n_layers": 2, "model.n_heads": 4,
            "model.n_kv_heads": 2, "model.intermediate_size": 48, "model.qk_norm": "false",
            "model.moe.n_experts": 4, "model.moe.intermediate_size": 24, "model.moe.first_k_dense": 0,
            "model.attention.layer_types": "[sliding, full]", "model.attention.window": 8,
            "data.dir": data_dir, "data.recipe": "null", "train.micro_batch_size": 2, "train.eval_batches": 1,
            "stages": "[{name: a, seq_len: 16, steps: 2}, {name: b, seq_len: 32, steps: 2, "
                      "rope: {type: yarn, factor: 2.0}}]",
            "logging.console": "plain", "logging.wandb.mode": "disabled", "eval.enabled": "false",
            "export.enabled": "true", "export.verify": "true", "export.dtype": "bf16", "data.synthetic": "{}"}
    args = launcher + [os.path.join(ROOT, "scripts", "train.py"), "--config",
                       os.path.join(ROOT, "configs", "default.yaml"), "--run-dir", run]
    args += [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[export] verify passed" in r.stderr
    return run


def test_trainer_exports_and_verifies_at_the_end(tmp_path, data_dir):
    run = _train_with_export(tmp_path, data_dir, [sys.executable])
    with open(os.path.join(run, "export", "moetrain_export.json")) as f:
        report = json.load(f)
    assert report["architecture"] == "Qwen2MoeForCausalLM" and report["dtype"] == "bf16"  # per-layer sliding
    assert report["verify"]["passed"] and report["source"].endswith("step_00000004")
    with open(os.path.join(run, "export", "config.json")) as f:
        cfg = json.load(f)
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["max_position_embeddings"] == 32
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] and cfg["sliding_window"] == 8


@pytest.mark.dist
def test_two_ranks_rank0_exports_while_the_other_leaves(tmp_path, data_dir):
    """Rank 0 exports while rank 1 returns without a barrier (so a long export cannot hit the
    process-group timeout); the launch still succeeds and the export verifies."""
    run = _train_with_export(tmp_path, data_dir, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  "2", "--master_port", str(random.randint(20000, 40000))])
    with open(os.path.join(run, "export", "moetrain_export.json")) as f:
        report = json.load(f)
    assert report["verify"]["passed"] and report["source"].endswith("step_00000004")


def test_final_stage_of_a_checkpoint_saved_at_a_stage_boundary():
    """A run capped (train.max_steps) right at a stage end saves stage = the next one with
    step_in_stage 0: the weights have only ever seen the previous stage's RoPE."""
    cfg = tiny_config("mixtral", rope="llama3")
    rope, seq_len, _ = final_stage(cfg, {"stage": 1, "step_in_stage": 1, "world_size": 1})
    assert (rope.type, rope.original_max_position_embeddings, seq_len) == ("llama3", 16, 32)
    rope, seq_len, _ = final_stage(cfg, {"stage": 1, "step_in_stage": 0, "world_size": 1})
    assert (rope.type, seq_len) == ("none", 16)
