"""ParallelDims validation and parallelize: a no-op on one process, EP == unsharded on two."""
import copy
import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "moe"))
import moe_dist_workers as workers  # noqa: E402

from moetrain.model import build_model  # noqa: E402
from moetrain.model.moe import LocalDispatcher, moe_layers  # noqa: E402
from moetrain.parallel import ParallelDims, parallelize  # noqa: E402


def test_dims_derive_dp_edp_and_ep_rank():
    d = ParallelDims(world=8, rank=5, ep=4)
    assert (d.dp, d.edp, d.ep_rank, d.sp) == (8, 2, 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.ep = 2


def test_dims_refuse_a_world_the_experts_do_not_divide():
    with pytest.raises(ValueError, match=r"model.moe.ep_size=4 needs a multiple of 4 processes; this launch has 6"):
        ParallelDims.from_config(workers.tiny_cfg(ep_size=4), world=6, rank=0)
    with pytest.raises(ValueError, match="sequence parallel size 4"):
        ParallelDims(world=6, rank=0, sp=4)


def test_dims_from_config_reads_ep_and_ignores_it_without_experts():
    d = ParallelDims.from_config(workers.tiny_cfg(ep_size=2), world=4, rank=3)
    assert (d.world, d.rank, d.ep, d.edp, d.ep_rank) == (4, 3, 2, 2, 1)
    dense = workers.tiny_cfg(ep_size=2)
    dense.model.moe.n_experts = 0
    assert ParallelDims.from_config(dense, world=1, rank=0).ep == 1


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_parallelize_on_one_process_changes_no_output(zero_stage):
    cfg = workers.tiny_cfg(aux_loss_scope="global_batch")
    cfg.deepspeed.zero_stage = zero_stage
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ref = copy.deepcopy(model)
    par = parallelize(model, ParallelDims(world=1, rank=0), cfg)
    assert par.ep_groups is None and par.ep_group is None and not hasattr(model, "ep_groups")
    assert all(type(m.dispatcher) is LocalDispatcher for m in moe_layers(model))
    ids = workers.global_batch(1)
    a, b = model(ids, labels=ids), ref(ids, labels=ids)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.aux_loss, b.aux_loss)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]


@pytest.mark.dist
def test_parallelize_ep2_two_processes_equals_unsharded():
    """The EP worker builds through parallelize (plain torch groups): losses and every
    gradient match the unsharded model; global-batch counts compose with the all-to-all."""
    workers.spawn(workers.ep_equivalence, 2, [
        (2, {}),
        (2, {"aux_loss_scope": "global_batch", "aux_loss_coef": 0.5}),
    ])
