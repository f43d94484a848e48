"""Expert parallelism on CPU over gloo: EP == EP=1, DeepSpeed expert groups, checkpoints."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import moe_dist_workers as workers  # noqa: E402

from moetrain.config import ConfigError, load_config  # noqa: E402


@pytest.mark.dist
def test_ep2_two_processes_equals_ep1():
    """Losses and every gradient: dropless, capacity + shared experts, sigmoid
    group-limited routing, global-batch balancing (counts all-reduced) with
    activation checkpointing (the all-to-all reruns in backward)."""
    workers.spawn(workers.ep_equivalence, 2, [
        (2, {}),
        (2, {"capacity_factor": 1.0, "n_shared_experts": 1, "shared_expert_gate": True}),
        (2, {"router": "sigmoid", "n_groups": 2, "topk_groups": 1, "routed_scaling_factor": 2.0,
             "seq_aux_loss_coef": 0.01}),
        (2, {"aux_loss_scope": "global_batch", "aux_loss_coef": 0.5, "activation_checkpointing": True}),
        (1, {"aux_loss_scope": "global_batch", "aux_loss_coef": 0.5}),
    ])


@pytest.mark.dist
def test_ep4_and_ep2_four_processes_equal_ep1():
    workers.spawn(workers.ep_equivalence, 4, [(4, {}), (2, {"capacity_factor": 1.25})])


@pytest.mark.dist
def test_deepspeed_ep2_zero012_train_like_ep1_and_resume_exactly(tmp_path):
    """Expert params in DeepSpeed's expert-data-parallel groups: ZeRO-0/1/2 with
    EP=2 match EP=1 step for step; save -> load restores every expert tensor and
    its optimizer state (the next step is bit-identical); the export gather
    rebuilds every expert from the per-rank shards."""
    workers.spawn(workers.deepspeed_ep, 2, 2, [0, 1, 2], str(tmp_path))


def test_zero3_with_ep_is_refused_clearly():
    with pytest.raises(ConfigError, match="ep_size=2 needs deepspeed.zero_stage 0, 1 or 2"):
        load_config(None, ["model.moe.ep_size=2", "deepspeed.zero_stage=3"])


def test_ep_without_enough_processes_is_refused():
    """One process cannot hold ep_size=2: refused whether or not an earlier test in
    this process already initialised a (world size 1) process group."""
    import torch.distributed as dist

    from moetrain.model import build_model
    from moetrain.parallel import ParallelDims, parallelize
    cfg = workers.tiny_cfg(ep_size=2)
    expected = "needs a multiple of 2 processes" if dist.is_initialized() else "needs torch.distributed"
    with pytest.raises(ValueError, match=expected):
        parallelize(build_model(cfg.model), ParallelDims.from_config(cfg), cfg)


def test_gather_expert_state_dict_concatenates_in_rank_order(tmp_path):
    from moetrain.checkpoint import expert_shard_path, gather_expert_state_dict
    full = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)
    for r in range(2):
        torch.save({"ep_size": 2, "ep_rank": r, "tensors": {"layers.1.mlp.experts.gate_EFd": full[2 * r:2 * r + 2]}},
                   expert_shard_path(str(tmp_path), r))
    sd = {"layers.1.mlp.experts.gate_EFd": full[:2].clone(), "embed.weight": torch.ones(1)}
    out = gather_expert_state_dict(sd, str(tmp_path))
    assert torch.equal(out["layers.1.mlp.experts.gate_EFd"], full) and torch.equal(out["embed.weight"], torch.ones(1))
    os.remove(expert_shard_path(str(tmp_path), 1))
    with pytest.raises(ValueError, match="missing experts_ep1.pt"):
        gather_expert_state_dict(sd, str(tmp_path))
