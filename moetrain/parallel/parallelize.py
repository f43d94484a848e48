"""parallelize: apply the run's parallelism to the plain model, once.

Called on the freshly built, identically seeded model before the optimizer
and deepspeed.initialize (torchtitan's parallelize_fn). Everything a caller
needs later (expert groups for grad norms and checkpoints) comes back in the
returned Parallelism; nothing is stored on the model except what DeepSpeed
itself requires (expert-param tags and its MoE marker, expert_parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
import torch.nn as nn

from moetrain.model.moe import MoE, moe_layers
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.expert_parallel import EPGroups, apply_expert_parallel, apply_global_batch_balancing
from moetrain.parallel.memory import apply_memory
from moetrain.parallel.sequence import apply_sequence_parallel


@dataclass(frozen=True)
class Parallelism:
    dims: ParallelDims
    ep_groups: Optional[EPGroups] = None  # None when ep == 1 (or the model has no MoE layers)
    sp_shard: Optional[object] = None     # moetrain.model.shard.SequenceShard of this rank (size 1: no SP)

    @property
    def ep_group(self):
        """The process group one full set of experts spans (None: this rank holds them all)."""
        return self.ep_groups.ep_group if self.ep_groups is not None else None

    @property
    def sp_group(self):
        """The process group one sequence is split over (None without sequence parallelism)."""
        return getattr(self.sp_shard, "group", None)


def parallelize(model: nn.Module, dims: ParallelDims, cfg, *, use_deepspeed: bool = True) -> Parallelism:
    """Collective. Expert parallelism (shard experts, all-to-all dispatch), global-batch
    balancing of router counts, sequence parallelism (Ulysses attention, group-wide loss
    and router statistics), memory tools (cfg.memory), ZeRO-3 leaf modules. `use_deepspeed=False` builds plain
    torch.distributed expert groups and no DeepSpeed marker (for runs without an engine)."""
    if dims.world > 1 and not dist.is_initialized():
        raise ValueError(f"a {dims.world}-process layout needs torch.distributed (launch with deepspeed/torchrun)")
    if dist.is_initialized() and dist.get_world_size() != dims.world:
        raise ValueError(f"ParallelDims says world={dims.world}, torch.distributed has {dist.get_world_size()}")
    ep_groups = apply_expert_parallel(model, dims.ep, use_deepspeed)
    if moe_layers(model) and cfg.model.moe.aux_loss_scope == "global_batch" and dims.world > 1:
        apply_global_batch_balancing(model)
    sp_shard = apply_sequence_parallel(model, dims.sp)
    apply_memory(model, cfg)  # after the dispatchers are set: tiling wraps them
    if not moe_layers(model):
        return Parallelism(dims, ep_groups, sp_shard)
    if cfg.deepspeed.zero_stage == 3:
        # An MoE layer touches its experts' stacked weights outside their own
        # module's forward; make ZeRO-3 gather the whole MoE block at once.
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, [MoE])
    return Parallelism(dims, ep_groups, sp_shard)
