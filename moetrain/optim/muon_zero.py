"""Muon under ZeRO-1/2. DeepSpeed hands the optimizer one flat fp32 partition per param
group (this rank's 1/dp of the group's parameters laid back to back), so no rank holds a
whole matrix. Momentum, Nesterov and weight decay are elementwise and stay on the
partition; only Newton-Schulz needs whole matrices: the group's Nesterov update is
all-gathered over the group's data-parallel ranks (the expert-data-parallel group for
expert groups), every matrix overlapping this rank's partition is orthogonalised whole
(a stacked expert tensor per expert, as at ZeRO-0) with the Moonlight scale, and this rank
keeps its slice. Every element sees the ZeRO-0 arithmetic; the momentum buffer is a flat
partition like Adam's moments, so DeepSpeed checkpoints it and reshard.py re-splits it.

DeepSpeed's own ZeRO Muon hook (stage_1_and_2.py, params tagged `use_muon`) is not used:
it brings its own iteration (Gram NS, sqrt(max(1, R/C)) scale, lerp momentum), not the
Moonlight recipe. Our parameters carry no `use_muon` attribute, so it stays off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moetrain.optim.muon import muon_scale, newton_schulz


@dataclass(frozen=True)
class FlatLayout:
    """Where one group's matrices sit in DeepSpeed's flat group (partition r = [r*size, (r+1)*size))."""
    shapes: tuple          # each parameter's shape, in DeepSpeed's flat order
    offsets: tuple         # its first element in the whole flat group
    partition_size: int
    rank: int              # this rank's partition
    world: int             # partitions (the group's data-parallel size)
    group: object          # their process group


def attach_zero_layouts(zero_optimizer) -> None:
    """After deepspeed.initialize at ZeRO-1/2: tell the wrapped MoonlightMuon where each Muon
    group's matrices lie. Kept on the optimizer, not in its param groups (those are saved), and
    keyed by the flat partition itself: DeepSpeed steps one group at a time, handing the
    optimizer a one-group param_groups list, so group indices do not survive into step()."""
    inner = zero_optimizer.optimizer
    layouts = {}
    for i, g in enumerate(inner.param_groups):
        if not g.get("use_muon"):
            continue
        pg = zero_optimizer.real_dp_process_group[i]
        layouts[id(g["params"][0])] = FlatLayout(tuple(tuple(p.shape) for p in zero_optimizer.round_robin_bit16_groups[i]),
                                tuple(int(o) for o in zero_optimizer.round_robin_bit16_offsets[i]),
                                int(zero_optimizer.partition_size[i]), dist.get_rank(group=pg),
                                dist.get_world_size(group=pg), pg)
    inner.zero_layouts = layouts


def orthogonalised_partition(u: torch.Tensor, lay: FlatLayout, ns_steps: int) -> torch.Tensor:
    """This rank's slice of [newton_schulz(U) * muon_scale] for every matrix U of the group,
    from this rank's slice `u` ([partition_size]) of the flat Nesterov update."""
    if lay.world > 1:
        parts = [torch.empty_like(u) for _ in range(lay.world)]
        dist.all_gather(parts, u.contiguous(), group=lay.group)
        full = torch.cat(parts)
    else:
        full = u
    lo, hi = lay.rank * lay.partition_size, (lay.rank + 1) * lay.partition_size
    out = torch.zeros_like(u)  # padding positions get no update
    for shape, off in zip(lay.shapes, lay.offsets):
        n = math.prod(shape)
        a, b = max(off, lo), min(off + n, hi)
        if a >= b:  # the matrix lies wholly in other ranks' partitions
            continue
        X = newton_schulz(full[off:off + n].view(shape), ns_steps) * muon_scale(torch.Size(shape))
        out[a - lo:b - lo] = X.reshape(-1)[a - off:b - off]
    return out
