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
same way (both directions differentiable). Each MoE layer gets this as its
dispatcher (MoE.set_dispatcher), not by patching. DeepSpeed learns about the
expert parameters through `allreduce=False` / `group_name` tags and a
parameter-less `deepspeed.moe.layer.MoE` marker, so ZeRO-1/2 and the plain
engine reduce expert gradients only across EDP replicas.

Checkpoints: DeepSpeed writes the model file from rank 0 only, which would
keep rank 0's experts, so every EP rank also writes its slice next to it
(moetrain/checkpoint/experts.py).

Legend: T tokens, K top-k, E global experts, El local experts, P ep_size,
S permuted rows (sent), R rows received from the EP group, d width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moetrain.kernels import moe_permute
from moetrain.model.moe import Dispatcher, Experts, grouped_swiglu, moe_layers, sort_by_expert

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


class AllToAllExperts(Dispatcher):
    """The MoE dispatcher under expert parallelism: tokens travel to their experts' rank."""

    def __init__(self, groups: EPGroups):
        self.groups = groups

    def run_experts(self, experts: Experts, x_Td, weights_TK, experts_TK):
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
    tag it. The tags (allreduce=False + group_name) are DeepSpeed's own protocol
    for expert parameters: its engine and ZeRO read them to reduce these grads
    over the EDP group only; is_expert_param reads the same tag."""
    El = experts.n_global // groups.ep_size
    first = groups.ep_rank * El
    for name in EXPERT_PARAMS:
        full = getattr(experts, name)
        local = nn.Parameter(full.detach()[first:first + El].clone(), requires_grad=full.requires_grad)
        local.allreduce, local.group_name = False, groups.name
        setattr(experts, name, local)
    experts.first = first


def apply_expert_parallel(model: nn.Module, ep_size: int, use_deepspeed: bool = False) -> Optional[EPGroups]:
    """Collective; part of parallelize (moetrain/parallel/parallelize.py), on the
    freshly built, identically seeded model. ep_size=1 changes nothing."""
    if ep_size == 1 or not moe_layers(model):
        return None
    groups = create_ep_groups(ep_size, use_deepspeed)
    dispatcher = AllToAllExperts(groups)
    for moe in moe_layers(model):
        _shard_experts(moe.experts, groups)
        moe.set_dispatcher(dispatcher)
    if use_deepspeed:  # DeepSpeed's protocol, see _deepspeed_marker; the one thing EP adds to the model
        model.add_module(MARKER_NAME, _deepspeed_marker(moe_layers(model)[0].n_experts, ep_size))
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
    """An expert-parallel slice (DeepSpeed's tag, see _shard_experts): its grads are not all-reduced over the world."""
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
class GlobalBatchCounts(Dispatcher):
    """Global-batch balancing around any dispatcher: experts run as `inner` runs
    them; balancing counts are summed over the ranks of `group`."""

    def __init__(self, inner: Dispatcher, group=None):
        self.inner, self.group = inner, group

    def run_experts(self, experts: Experts, x_Td, weights_TK, experts_TK):
        return self.inner.run_experts(experts, x_Td, weights_TK, experts_TK)

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        out = counts.clone()
        dist.all_reduce(out, group=self.group)
        return out


def apply_global_batch_balancing(model: nn.Module, group=None) -> None:
    """Every rank routes its own tokens (also under EP), so the data-parallel
    group for router statistics is the whole world by default."""
    for moe in moe_layers(model):
        moe.set_dispatcher(GlobalBatchCounts(moe.dispatcher, group))
