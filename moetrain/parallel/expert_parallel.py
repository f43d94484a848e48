"""Expert parallelism, applied to the plain model from outside.

Layout (simple on purpose, so export and load_model can gather it): with
ep_size = P, ranks [0, P), [P, 2P), ... form the expert-parallel (EP) groups
and ranks r, r+P, r+2P, ... the expert-data-parallel (EDP) replicas of the
same experts (DeepSpeed's default E+D layout). Rank r of an EP group holds
global experts [r*E/P, (r+1)*E/P) of every MoE layer as contiguous slices of
the stacked weights; state-dict names do not change. Routers, shared experts
and everything else stay replicated on all ranks.

Forward: tokens are routed on their own rank, sorted by global expert, and
sent to the expert's owner with an uneven all-to-all; results come back the
same way (both directions differentiable). DeepSpeed learns about the expert
parameters through `allreduce=False` / `group_name` tags and a parameter-less
`deepspeed.moe.layer.MoE` marker, so ZeRO-1/2 and the plain engine reduce
expert gradients only across EDP replicas.

Checkpoints: DeepSpeed writes the model file from rank 0 only, which would
keep rank 0's experts, so every EP rank also writes its slice next to it
(`experts_ep{r}.pt`, see save_expert_shards); `gather_expert_state_dict`
rebuilds full stacked tensors for export.

Legend: T tokens, K top-k, E global experts, El local experts, P ep_size,
S permuted rows (sent), R rows received from the EP group, d width.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moetrain.kernels import moe_permute
from moetrain.model.moe import Experts, grouped_swiglu, moe_layers, sort_by_expert

EXPERT_PARAMS = ("gate_EFd", "up_EFd", "down_EdF")  # stacked along dim 0 (the expert dim)
MARKER_NAME = "ds_moe_marker"


@dataclass
class EPGroups:
    ep_size: int
    ep_rank: int
    ep_group: object      # the P ranks whose experts together make one full layer
    edp_group: object     # the world/P replicas of this rank's experts
    name: str             # DeepSpeed's group name ("ep_size_P")


def create_ep_groups(ep_size: int, use_deepspeed: bool = False) -> EPGroups:
    """Collective. With `use_deepspeed`, the groups are DeepSpeed's own
    (deepspeed.utils.groups), so the engine and ZeRO reduce over the same ones."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"model.moe.ep_size={ep_size} needs a multiple of {ep_size} processes; "
                         f"this launch has {world}")
    name = f"ep_size_{ep_size}"
    if use_deepspeed:
        from deepspeed.utils import groups
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(ep_size)
        return EPGroups(ep_size, rank % ep_size, groups._get_expert_parallel_group(name),
                        groups._get_expert_data_parallel_group(name), name)
    ep_group = edp_group = None
    for start in range(0, world, ep_size):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(start, start + ep_size)))
        ep_group = g if start <= rank < start + ep_size else ep_group
    for i in range(ep_size):
        g = dist.new_group(list(range(i, world, ep_size)))
        edp_group = g if rank % ep_size == i else edp_group
    return EPGroups(ep_size, rank % ep_size, ep_group, edp_group, name)


# --------------------------------------------------------------------------- all-to-all
class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(g.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x, out_splits: list, in_splits: list, group):
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllExperts:
    """`MoE.experts_fn` under expert parallelism (same signature as experts_grouped)."""

    def __init__(self, groups: EPGroups):
        self.groups = groups

    def __call__(self, experts: Experts, x_Td, weights_TK, experts_TK):
        P, El, group = self.groups.ep_size, experts.n_local, self.groups.ep_group
        src_S, pos_TK, counts_E = sort_by_expert(experts_TK, experts.n_global)
        x_Sd = moe_permute.permute(x_Td, src_S, pos_TK, backend=experts.permute_backend)
        send_PE = counts_E.view(P, El)             # row p: my rows for rank p's experts
        recv_PE = torch.empty_like(send_PE)        # row p: rank p's rows for my experts
        dist.all_to_all_single(recv_PE, send_PE, group=group)
        in_splits, out_splits = send_PE.sum(1).tolist(), recv_PE.sum(1).tolist()
        n_sent = sum(in_splits)                    # dropped slots (the tail of x_Sd) stay home
        recv_Rd = all_to_all(x_Sd[:n_sent], out_splits, in_splits, group)
        # Received rows come grouped by (source rank, expert); the grouped matmul wants expert-major.
        seg = torch.arange(P * El, device=recv_Rd.device).repeat_interleave(recv_PE.flatten())
        order = ((seg % El) * P + seg // El).argsort(stable=True)
        y_Rd = torch.empty_like(recv_Rd)
        y_Rd[order] = grouped_swiglu(experts, recv_Rd[order], recv_PE.sum(0)).to(y_Rd.dtype)
        y_Sd = all_to_all(y_Rd, in_splits, out_splits, group)
        if n_sent < x_Sd.shape[0]:
            y_Sd = torch.cat([y_Sd, y_Sd.new_zeros(x_Sd.shape[0] - n_sent, y_Sd.shape[1])])
        return moe_permute.unpermute(y_Sd, src_S, pos_TK, weights_TK, backend=experts.permute_backend)


# --------------------------------------------------------------------------- applying EP
def _shard_experts(experts: Experts, groups: EPGroups) -> None:
    """Keep only this rank's contiguous slice of every stacked expert weight and
    tag it for DeepSpeed (allreduce=False + group_name = expert parameter)."""
    El = experts.n_global // groups.ep_size
    first = groups.ep_rank * El
    for name in EXPERT_PARAMS:
        full = getattr(experts, name)
        local = nn.Parameter(full.detach()[first:first + El].clone(), requires_grad=full.requires_grad)
        local.allreduce, local.group_name = False, groups.name
        setattr(experts, name, local)
    experts.first = first


def apply_expert_parallel(model: nn.Module, ep_size: int, use_deepspeed: bool = False) -> Optional[EPGroups]:
    """Collective; call on the freshly built (identically seeded) model before
    the optimizer and deepspeed.initialize. ep_size=1 changes nothing."""
    if ep_size == 1 or not moe_layers(model):
        return None
    groups = create_ep_groups(ep_size, use_deepspeed)
    dispatcher = AllToAllExperts(groups)
    for moe in moe_layers(model):
        _shard_experts(moe.experts, groups)
        moe.experts_fn = dispatcher
    if use_deepspeed:
        model.add_module(MARKER_NAME, _deepspeed_marker(moe_layers(model)[0].n_experts, ep_size))
    model.ep_groups = groups
    return groups


def _deepspeed_marker(n_experts: int, ep_size: int) -> nn.Module:
    """DeepSpeed switches on its MoE handling (expert grad reduction over EDP
    groups, MoE optimizer groups in ZeRO) only when the model contains a
    deepspeed.moe.layer.MoE. This one holds no parameters and never runs;
    num_local_experts=0 keeps DeepSpeed's own per-expert checkpoint files (which
    assume its deepspeed_experts.N layout) empty: we write our experts ourselves."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedMoEMarker(DeepSpeedMoE):
        def __init__(self):
            nn.Module.__init__(self)  # not DeepSpeedMoE.__init__: it would build experts of its own
            self.num_experts, self.ep_size, self.num_local_experts = n_experts, ep_size, 0
            self.expert_group_name = f"ep_size_{ep_size}"

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # groups were created by create_ep_groups

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker only marks the model for DeepSpeed; it has no forward")

    return DeepSpeedMoEMarker()


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def moe_param_groups(param_groups: list) -> list:
    """Optimizer groups for DeepSpeed MoE: expert parameters move to their own
    groups ('moe': True, name = EDP group) so ZeRO partitions and reduces them
    over EDP replicas only. Unchanged when the model has no EP experts."""
    if not any(is_expert_param(p) for g in param_groups for p in g["params"]):
        return param_groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(param_groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]


# --------------------------------------------------------------------------- balancing across ranks
class SumOverRanks:
    """MoE.count_reducer for global-batch balancing: expert counts summed over ranks."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        out = counts.clone()
        dist.all_reduce(out, group=self.group)
        return out


def enable_global_batch_balancing(model: nn.Module, group=None) -> None:
    """Every rank routes its own tokens (also under EP), so the data-parallel
    group for router statistics is the whole world by default."""
    for moe in moe_layers(model):
        moe.count_reducer = SumOverRanks(group)


def prepare_moe(model: nn.Module, cfg, use_deepspeed: bool = True) -> Optional[EPGroups]:
    """The training hook: EP (cfg.model.moe.ep_size) and global-batch balancing,
    before the optimizer is built and deepspeed.initialize runs."""
    m = cfg.model.moe
    if m.n_experts == 0:
        return None
    if not dist.is_initialized():
        if m.ep_size > 1:
            raise ValueError(f"model.moe.ep_size={m.ep_size} needs torch.distributed (launch with deepspeed/torchrun)")
        return None
    groups = apply_expert_parallel(model, m.ep_size, use_deepspeed)
    if m.aux_loss_scope == "global_batch" and dist.get_world_size() > 1:
        enable_global_batch_balancing(model)
    return groups


# --------------------------------------------------------------------------- checkpoints
def expert_shard_path(ckpt_dir: str, ep_rank: int) -> str:
    return os.path.join(ckpt_dir, f"experts_ep{ep_rank}.pt")


def save_expert_shards(model: nn.Module, ckpt_dir: str, groups: EPGroups) -> None:
    """Collective. One writer per EP rank (EDP rank 0) stores its expert slices
    under their usual state-dict names: {"ep_size", "ep_rank", "tensors"}."""
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


def attach_expert_checkpointing(engine, groups: Optional[EPGroups]) -> None:
    """Make engine.save_checkpoint / load_checkpoint also write / read this EP
    rank's experts inside the tag folder (so they are in place before our
    COMPLETE marker is written). No-op without expert parallelism."""
    if groups is None:
        return
    ds_save, ds_load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, *args, **kwargs):
        tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
        out = ds_save(save_dir, tag, *args, **kwargs)
        save_expert_shards(engine.module, os.path.join(save_dir, tag), groups)
        return out

    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        out = ds_load(load_dir, tag, *args, **kwargs)
        if out[0] is not None:
            if tag is None:
                with open(os.path.join(load_dir, "latest")) as f:
                    tag = f.read().strip()
            load_expert_shards(engine.module, os.path.join(load_dir, str(tag)), groups)
        return out

    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


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
