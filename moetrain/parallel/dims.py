"""How the ranks are split, decided once per run (torchtitan's ParallelDims).

Layout: ranks [0, ep), [ep, 2ep), ... are the expert-parallel groups, ranks
r, r+ep, r+2ep, ... the expert-data-parallel replicas of the same experts
(moetrain/parallel/expert_parallel.py). Sequence parallelism (DeepSpeed-Ulysses,
moetrain/parallel/sequence.py): ranks [0, sp), [sp, 2sp), ... each split one
batch's sequences; so `dp` = world / sp distinct batches per step (the loader
splits over these), while DeepSpeed and ZeRO still partition and average over
all `world` ranks (SP ranks count as data-parallel ranks for ZeRO).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    world: int
    rank: int
    ep: int = 1   # expert parallel: each MoE layer's experts split over ep ranks
    sp: int = 1   # sequence parallel: one sequence split over sp ranks

    def __post_init__(self):
        if self.ep < 1 or self.world % self.ep:
            raise ValueError(f"model.moe.ep_size={self.ep} needs a multiple of {self.ep} processes; this launch "
                             f"has {self.world}: launch a multiple of {self.ep} processes or set "
                             f"model.moe.ep_size to a divisor of {self.world}")
        if self.sp < 1 or self.world % self.sp:
            raise ValueError(f"sequence parallel size {self.sp} (deepspeed.sequence_parallel_size) needs a multiple "
                             f"of {self.sp} processes; "
                             f"this launch has {self.world}: launch a multiple of {self.sp} processes or set "
                             f"deepspeed.sequence_parallel_size to a divisor of {self.world}")
        assert 0 <= self.rank < self.world, (self.rank, self.world)

    @classmethod
    def from_config(cls, cfg, world: Optional[int] = None, rank: Optional[int] = None) -> "ParallelDims":
        """`world`/`rank` default to torch.distributed's (1 and 0 when it is not initialised)."""
        m = cfg.model.moe
        ep = m.ep_size if m.n_experts else 1  # a dense model has no experts to split
        sp = cfg.deepspeed.sequence_parallel_size
        if world is None:
            for key, size in (("model.moe.ep_size", ep), ("deepspeed.sequence_parallel_size", sp)):
                if not dist.is_initialized() and size > 1:
                    raise ValueError(f"{key}={size} needs torch.distributed (launch with deepspeed/torchrun)")
            world = dist.get_world_size() if dist.is_initialized() else 1
            rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(world=world, rank=rank or 0, ep=ep, sp=sp)

    @property
    def dp(self) -> int:
        """Data-parallel replicas: distinct batches per step (world / sp)."""
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        """Which of the dp batches this rank's sequence-parallel group reads."""
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        """Which contiguous shard of every sequence this rank holds."""
        return self.rank % self.sp

    @property
    def zero_world(self) -> int:
        """Ranks DeepSpeed sees as data parallel: ZeRO partitions and gradients are averaged
        over all of them, SP ranks included (DeepSpeed-Ulysses' sequence-data-parallel group)."""
        return self.world

    @property
    def edp(self) -> int:
        """Replicas of each expert slice (its gradients are reduced over these)."""
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        """Which slice of the experts this rank holds."""
        return self.rank % self.ep


def barrier() -> None:
    """dist.barrier() that is a no-op without a process group (plain single-process use)."""
    if dist.is_initialized():
        dist.barrier()
