"""Expert-parallel shards: DeepSpeed writes the module file from rank 0 only, which
would keep rank 0's experts, so every EP rank also writes its slice of the stacked
expert tensors next to it (experts_ep{r}.pt = {"ep_size", "ep_rank", "tensors"},
under the usual state-dict names). EP rank r holds global experts [r*E/P, (r+1)*E/P)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from moetrain.checkpoint.layout import expert_shard_path

if TYPE_CHECKING:  # at run time parallel/ is imported lazily: it may itself import this package
    from moetrain.parallel.expert_parallel import EPGroups

__all__ = ["expert_shard_path", "gather_expert_state_dict", "load_expert_shards", "save_expert_shards"]


def save_expert_shards(model: nn.Module, ckpt_dir: str, groups: EPGroups) -> None:
    """Collective. One writer per EP rank (EDP rank 0); the other replicas hold the same slices."""
    from moetrain.parallel.expert_parallel import is_expert_param
    if dist.get_rank(group=groups.edp_group) == 0:
        tensors = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if is_expert_param(p)}
        os.makedirs(ckpt_dir, exist_ok=True)
        torch.save({"ep_size": groups.ep_size, "ep_rank": groups.ep_rank, "tensors": tensors},
                   expert_shard_path(ckpt_dir, groups.ep_rank))
    dist.barrier()


@torch.no_grad()
def load_expert_shards(model: nn.Module, ckpt_dir: str, groups: EPGroups) -> None:
    """Copy this rank's expert slices back (DeepSpeed's model file only has rank 0's).
    Optimizer state and ZeRO fp32 masters come back through DeepSpeed itself."""
    path = expert_shard_path(ckpt_dir, groups.ep_rank)
    if not os.path.exists(path):
        raise ValueError(f"{ckpt_dir} has no {os.path.basename(path)}: it was not written with "
                         f"model.moe.ep_size={groups.ep_size}; resume with the ep_size it was trained with")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob["ep_size"] != groups.ep_size:
        raise ValueError(f"{ckpt_dir} holds experts for ep_size={blob['ep_size']}, this run uses "
                         f"{groups.ep_size}; resume with model.moe.ep_size={blob['ep_size']}")
    params = dict(model.named_parameters())
    for name, t in blob["tensors"].items():
        params[name].copy_(t)


def gather_expert_state_dict(state_dict: dict, ckpt_dir: str) -> dict:
    """For export and load_model: `state_dict` (DeepSpeed's model file, which has
    rank 0's expert slices) with every stacked expert tensor replaced by the full
    one, concatenated over experts_ep*.pt in EP-rank order. Unchanged when the
    checkpoint has no expert shards (ep_size 1)."""
    first = expert_shard_path(ckpt_dir, 0)
    if not os.path.exists(first):
        return state_dict
    P = torch.load(first, map_location="cpu", weights_only=True)["ep_size"]
    blobs = []
    for r in range(P):
        path = expert_shard_path(ckpt_dir, r)
        if not os.path.exists(path):
            raise ValueError(f"{ckpt_dir} is missing {os.path.basename(path)} (ep_size={P}); "
                             "the checkpoint is incomplete")
        blobs.append(torch.load(path, map_location="cpu", weights_only=True)["tensors"])
    out = dict(state_dict)
    for name in blobs[0]:
        out[name] = torch.cat([b[name] for b in blobs], dim=0)
    return out
