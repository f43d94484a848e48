"""How the ranks are split, decided once per run (torchtitan's ParallelDims).

Layout: ranks [0, ep), [ep, 2ep), ... are the expert-parallel groups, ranks
r, r+ep, r+2ep, ... the expert-data-parallel replicas of the same experts
(moetrain/parallel/expert_parallel.py). Sequence parallelism (sp) has its
slot so callers already ask `dims.dp` instead of the world size; it is 1
until DeepSpeed-Ulysses lands.
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
    sp: int = 1   # sequence parallel: one sequence split over sp ranks (always 1 for now)

    def __post_init__(self):
        if self.ep < 1 or self.world % self.ep:
            raise ValueError(f"model.moe.ep_size={self.ep} needs a multiple of {self.ep} processes; this launch "
                             f"has {self.world}: launch a multiple of {self.ep} processes or set "
                             f"model.moe.ep_size to a divisor of {self.world}")
        if self.sp < 1 or self.world % self.sp:
            raise ValueError(f"sequence parallel size {self.sp} needs a multiple of {self.sp} processes; "
                             f"this launch has {self.world}")
        assert 0 <= self.rank < self.world, (self.rank, self.world)

    @classmethod
    def from_config(cls, cfg, world: Optional[int] = None, rank: Optional[int] = None) -> "ParallelDims":
        """`world`/`rank` default to torch.distributed's (1 and 0 when it is not initialised)."""
        m = cfg.model.moe
        ep = m.ep_size if m.n_experts else 1  # a dense model has no experts to split
        if world is None:
            if not dist.is_initialized() and ep > 1:
                raise ValueError(f"model.moe.ep_size={ep} needs torch.distributed (launch with deepspeed/torchrun)")
            world = dist.get_world_size() if dist.is_initialized() else 1
            rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(world=world, rank=rank or 0, ep=ep, sp=1)

    @property
    def dp(self) -> int:
        """Ranks that ZeRO partitions over and dense gradients are averaged over."""
        return self.world // self.sp

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
