"""Mixture-of-Experts feed-forward: routers, SwiGLU experts, balancing losses.

Legend: T tokens (B*S), d model width, E experts (this rank's under expert
parallelism), F expert FFN width, K top-k, S kept (token, slot) assignments
sorted by expert.

The per-expert loop (`experts_loop`) is the reference; `experts_grouped`
(assignments sorted by expert, one grouped matmul over contiguous expert
segments) is the fast path with the same signature. Both read dropped slots
as expert id -1 (capacity mode). How the experts run is the layer's one
extension point: a `Dispatcher` (local by default; parallel code hands in
e.g. the expert-parallel all-to-all through `MoE.set_dispatcher`).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.config import ModelConfig, MoEConfig
from moetrain.kernels import moe_permute
from moetrain.model.shard import SequenceShard


class SwiGLU(nn.Module):
    """Dense MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------- routing
@dataclass
class Routing:
    weights_TK: torch.Tensor  # combine weights of the chosen experts (fp32)
    experts_TK: torch.Tensor  # chosen expert ids (long)
    probs_TE: torch.Tensor    # router distribution over all experts (balancing losses, entropy)
    logits_TE: torch.Tensor   # raw router logits (z-loss)


class TopKRouter(nn.Module):
    """Top-k router: softmax (before or after top-k) or sigmoid scores, optional
    group-limited selection, aux-loss-free selection bias, routed scaling.

    The bias (`expert_bias`, a persistent buffer so checkpoints keep it) only
    changes which experts are chosen, never the combine weights (DeepSeek-V3)."""

    def __init__(self, d: int, n_experts: int, top_k: int, norm_topk_prob: bool = True, *,
                 score: str = "softmax", softmax_before_topk: bool = True, scaling: float = 1.0,
                 n_groups: int = 1, topk_groups: int = 1, jitter: float = 0.0, expert_bias: bool = False):
        super().__init__()
        self.top_k, self.norm_topk_prob, self.score = top_k, norm_topk_prob, score
        self.softmax_before_topk, self.scaling, self.jitter = softmax_before_topk, scaling, jitter
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.gate = nn.Linear(d, n_experts, bias=False)
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    @classmethod
    def from_config(cls, d: int, m: MoEConfig) -> "TopKRouter":
        return cls(d, m.n_experts, m.top_k, m.norm_topk_prob, score=m.router,
                   softmax_before_topk=m.softmax_before_topk, scaling=m.routed_scaling_factor,
                   n_groups=m.n_groups, topk_groups=m.topk_groups, jitter=m.router_jitter,
                   expert_bias=m.bias_update_speed > 0)

    def forward(self, x_Td) -> Routing:
        if self.training and self.jitter > 0:  # Switch-style multiplicative noise on the router input only
            x_Td = x_Td * torch.empty_like(x_Td).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = self.gate(x_Td).float()
        if self.score == "sigmoid":
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            probs = logits.softmax(dim=-1)
            scores = probs if self.softmax_before_topk else logits
        choice = scores.detach()
        if self.expert_bias is not None:  # sigmoid: added to the scores (DeepSeek-V3); softmax: to the
            # logits, i.e. p * e^b, so one bias step means the same whatever the router's temperature
            choice = choice * self.expert_bias.exp() if self.score == "softmax" else choice + self.expert_bias
        idx = self._limit_groups(choice).topk(self.top_k, dim=-1).indices
        w = scores.gather(-1, idx)
        if self.score == "softmax" and not self.softmax_before_topk:
            w = w.softmax(dim=-1)  # already sums to one
        elif self.norm_topk_prob and self.score == "sigmoid":
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        elif self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return Routing(w * self.scaling if self.scaling != 1.0 else w, idx, probs, logits)

    def _limit_groups(self, choice_TE):
        """Group-limited routing: keep the topk_groups groups whose two best experts
        score highest (DeepSeek-V3), mask the rest out of the top-k."""
        if self.n_groups == 1:
            return choice_TE
        T, E = choice_TE.shape
        g = choice_TE.view(T, self.n_groups, E // self.n_groups)
        group_score = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1)
        keep = group_score.topk(self.topk_groups, dim=-1).indices
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        return g.masked_fill(~mask[..., None], float("-inf")).view(T, E)


# --------------------------------------------------------------------------- losses
def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor,
                        counts_E: Optional[torch.Tensor] = None,
                        mean_probs_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch/GShard aux loss E * sum_e f_e * P_e; equals 1 under uniform routing.

    f_e: fraction of (token, slot) assignments sent to e (from `counts_E` when
    given, e.g. summed over data-parallel ranks); P_e: mean router prob here
    (`mean_probs_E` when given, e.g. over a sequence split across ranks)."""
    E = probs_TE.shape[-1]
    if counts_E is None:
        counts_E = torch.bincount(experts_TK.flatten(), minlength=E)
    f = counts_E.to(probs_TE.dtype) / counts_E.sum().clamp_min(1)
    return E * (f * (probs_TE.mean(dim=0) if mean_probs_E is None else mean_probs_E)).sum()


def sequence_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor,
                            segments_T: torch.Tensor, n: Optional[int] = None,
                            shard: Optional[SequenceShard] = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss: the Switch loss inside each sequence,
    averaged over sequences (1 when every one is balanced). `segments_T` numbers the
    sequence of each token 0..N-1: the batch rows, or the packed documents. Under
    sequence parallelism `shard` sums the per-sequence counts and probabilities over
    the ranks holding the other parts of the sequences (`n`: the number of sequences)."""
    E, K = probs_TE.shape[-1], experts_TK.shape[-1]
    n = n if n is not None else int(segments_T.max()) + 1
    seg_TK = segments_T[:, None].expand_as(experts_TK)
    counts_NE = probs_TE.new_zeros(n, E).index_put_((seg_TK.reshape(-1), experts_TK.reshape(-1)),
                                                   probs_TE.new_ones(experts_TK.numel()), accumulate=True)
    tokens_N = torch.bincount(segments_T, minlength=n)
    probs_NE = probs_TE.new_zeros(n, E).index_add_(0, segments_T, probs_TE)
    if shard is not None and shard.size > 1:
        counts_NE, tokens_N, probs_NE = shard.sum(counts_NE), shard.sum(tokens_N), shard.sum(probs_NE)
    tokens_N = tokens_N.to(probs_TE.dtype).clamp_min(1)[:, None]
    mean_probs_NE = probs_NE / tokens_N
    return E * (counts_NE / (tokens_N * K) * mean_probs_NE).sum(-1).mean()


def sequence_ids(B: int, S: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """Sequence number of each of the B*S tokens: its packed document when
    `cu_seqlens` is given (B == 1), else its row."""
    if cu_seqlens is None:
        return torch.arange(B, device=device).repeat_interleave(S)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    return torch.arange(lengths.numel(), device=device).repeat_interleave(lengths)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    return math.ceil(factor * n_tokens * top_k / n_experts)


def apply_capacity(weights_TK, experts_TK, n_experts: int, capacity: int):
    """Capacity mode: each expert keeps its `capacity` heaviest assignments; the
    others become expert -1 (dropped: the token's slot contributes nothing)."""
    flat_e, flat_w = experts_TK.flatten(), weights_TK.detach().flatten()
    by_weight = flat_w.argsort(descending=True, stable=True)
    order = by_weight[flat_e[by_weight].argsort(stable=True)]  # expert-major, heaviest first
    counts = torch.bincount(flat_e, minlength=n_experts)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
    keep = torch.empty_like(flat_e, dtype=torch.bool)
    keep[order] = rank < capacity
    return torch.where(keep.view_as(experts_TK), experts_TK, torch.full_like(experts_TK, -1))


# --------------------------------------------------------------------------- experts
class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights (grouped-matmul friendly).

    Under expert parallelism this rank holds the contiguous slice of global
    experts [first, first + E); state-dict names stay the same."""

    def __init__(self, n_experts: int, d: int, f: int):
        super().__init__()
        self.gate_EFd = nn.Parameter(torch.empty(n_experts, f, d))
        self.up_EFd = nn.Parameter(torch.empty(n_experts, f, d))
        self.down_EdF = nn.Parameter(torch.empty(n_experts, d, f))
        self.n_global, self.first = n_experts, 0
        self.permute_backend = "auto"

    @property
    def n_local(self) -> int:
        return self.gate_EFd.shape[0]

    def expert(self, e: int, x_Td):
        """Local expert e on its tokens."""
        h = F.silu(x_Td @ self.gate_EFd[e].t()) * (x_Td @ self.up_EFd[e].t())
        return h @ self.down_EdF[e].t()


def experts_loop(experts: Experts, x_Td, weights_TK, experts_TK):
    """Reference: for each expert, gather its tokens, run it, scatter-add back."""
    y = torch.zeros_like(x_Td)
    for e in range(experts.n_local):
        tok, slot = (experts_TK == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        out = experts.expert(e, x_Td[tok]) * weights_TK[tok, slot, None].to(x_Td.dtype)
        y.index_add_(0, tok, out)
    return y


def sort_by_expert(experts_TK, n_experts: int):
    """(src_S, pos_TK, counts_E): every slot sorted by expert (stable), dropped
    slots (-1) last, beyond sum(counts_E), with pos -1 so nothing reads them back.
    Keeping them avoids a device-to-host sync on the dropless path.
    Index conventions: moetrain.kernels.moe_permute."""
    flat = experts_TK.flatten()
    kept = flat >= 0
    key = torch.where(kept, flat, n_experts)
    src_S = key.argsort(stable=True)
    pos = torch.empty_like(flat)
    pos[src_S] = torch.arange(flat.numel(), device=flat.device)
    pos = torch.where(kept, pos, -1)
    return src_S, pos.view_as(experts_TK), torch.bincount(key, minlength=n_experts + 1)[:n_experts]


def _grouped_mm_ok(x_Sd, experts: Experts) -> bool:
    """torch._grouped_mm needs 16-byte aligned strides; on CUDA we use it for bf16 only."""
    if not hasattr(torch, "_grouped_mm") or x_Sd.dtype != experts.gate_EFd.dtype:
        return False
    if x_Sd.is_cuda and x_Sd.dtype != torch.bfloat16:
        return False
    el = x_Sd.element_size()
    F_, d = experts.gate_EFd.shape[1:]
    return x_Sd.dtype in (torch.float32, torch.bfloat16) and (F_ * el) % 16 == 0 and (d * el) % 16 == 0


def grouped_swiglu(experts: Experts, x_Sd, counts_E):
    """All local experts on expert-sorted rows: one grouped matmul per projection
    where torch._grouped_mm exists, a loop over contiguous segments otherwise."""
    if _grouped_mm_ok(x_Sd, experts):
        offs = counts_E.cumsum(0).to(torch.int32)
        # Rows past offs[-1] (dropped slots) are left undefined by the kernel, forward and
        # backward: zero them on the way in and out. On CUDA always (no host sync); on CPU
        # the check is free, so skip the masking when nothing was dropped.
        tail = None
        if x_Sd.is_cuda or int(offs[-1]) < x_Sd.shape[0]:
            tail = (torch.arange(x_Sd.shape[0], device=x_Sd.device) >= offs[-1])[:, None]
            x_Sd = x_Sd.masked_fill(tail, 0)
        gmm = torch._grouped_mm
        h = F.silu(gmm(x_Sd, experts.gate_EFd.transpose(1, 2), offs=offs))
        h = h * gmm(x_Sd, experts.up_EFd.transpose(1, 2), offs=offs)
        y_Sd = gmm(h, experts.down_EdF.transpose(1, 2), offs=offs)
        return y_Sd if tail is None else y_Sd.masked_fill(tail, 0)
    sizes = counts_E.tolist()
    segs = torch.split(x_Sd, sizes + [x_Sd.shape[0] - sum(sizes)])  # last: dropped slots, left at zero
    outs = [experts.expert(e, seg) for e, seg in enumerate(segs[:-1]) if seg.shape[0]]
    return torch.cat(outs + [segs[-1].new_zeros(segs[-1].shape[0], experts.down_EdF.shape[1])])


def experts_grouped(experts: Experts, x_Td, weights_TK, experts_TK):
    """Dropless fast path: sort assignments by expert, permute, grouped SwiGLU, weighted combine."""
    src_S, pos_TK, counts_E = sort_by_expert(experts_TK, experts.n_local)
    x_Sd = moe_permute.permute(x_Td, src_S, pos_TK, backend=experts.permute_backend)
    y_Sd = grouped_swiglu(experts, x_Sd, counts_E)
    return moe_permute.unpermute(y_Sd, src_S, pos_TK, weights_TK, backend=experts.permute_backend)


EXPERT_PATHS = {"loop": experts_loop, "grouped": experts_grouped}


# --------------------------------------------------------------------------- dispatch
class Dispatcher(abc.ABC):
    """How an MoE layer runs its experts, and over which tokens its balancing
    counts are taken. Subclasses: LocalDispatcher here; the expert-parallel
    all-to-all and the global-batch count reduction in moetrain/parallel/."""

    @abc.abstractmethod
    def run_experts(self, experts: Experts, x_Td, weights_TK, experts_TK):
        """y_Td = sum over slots k of weights_TK[:, k] * expert experts_TK[:, k](x_Td);
        slots with expert -1 (dropped) contribute nothing. Same signature as experts_grouped."""

    def reduce_counts(self, counts_E: torch.Tensor) -> Optional[torch.Tensor]:
        """Expert counts to balance over (e.g. summed over ranks), or None: this micro-batch's own."""
        return None


class LocalDispatcher(Dispatcher):
    """Every expert on this rank: one of EXPERT_PATHS (experts_loop / experts_grouped)."""

    def __init__(self, path: Callable = experts_grouped):
        self.path = path

    def run_experts(self, experts: Experts, x_Td, weights_TK, experts_TK):
        return self.path(experts, x_Td, weights_TK, experts_TK)


# --------------------------------------------------------------------------- layer
class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts). forward returns
    (y, aux_loss); `last_stats` keeps detached router stats for health metrics
    and the aux-loss-free bias update. `dispatcher` defaults to the local path
    named by model.moe.experts_backend."""

    def __init__(self, cfg: ModelConfig, dispatcher: Optional[Dispatcher] = None):
        super().__init__()
        m = cfg.moe
        d, f = cfg.hidden_size, m.intermediate_size or cfg.intermediate_size
        self.n_experts, self.top_k, self.capacity_factor = m.n_experts, m.top_k, m.capacity_factor
        self.aux_coef, self.seq_coef, self.z_coef = m.aux_loss_coef, m.seq_aux_loss_coef, m.z_loss_coef
        self.bias_update_speed = m.bias_update_speed
        self.router = TopKRouter.from_config(d, m)
        self.experts = Experts(m.n_experts, d, f)
        self.experts.permute_backend = m.permute_backend
        self.shared_experts = self.shared_gate = None
        if m.n_shared_experts:
            self.shared_experts = SwiGLU(d, m.shared_expert_intermediate_size or m.n_shared_experts * f)
            if m.shared_expert_gate:
                self.shared_gate = nn.Linear(d, 1, bias=False)
        self.dispatcher: Dispatcher = (dispatcher if dispatcher is not None
                                       else LocalDispatcher(EXPERT_PATHS[m.experts_backend]))
        self.last_stats: dict = {}
        self.shard = SequenceShard()  # sequence parallelism: MoETransformer.set_sequence_shard

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        """THE extension point for parallelism: replace how this layer runs its experts
        and reduces its balancing counts (expert parallelism, global-batch balancing).
        Read `self.dispatcher` first to wrap the current one instead of replacing it."""
        self.dispatcher = dispatcher

    def forward(self, x_BSd, cu_seqlens: Optional[torch.Tensor] = None):
        """x [B, S, d] (or [T, d], one sequence); cu_seqlens marks packed documents (B == 1),
        which the sequence-wise balance loss then treats as the sequences."""
        x_Td = x_BSd.reshape(-1, x_BSd.shape[-1])
        r = self.router(x_Td)
        experts_TK = r.experts_TK
        if self.capacity_factor is not None:
            experts_TK = self._capacity(r, x_BSd.shape[0] if x_BSd.dim() == 3 else 1)
        y = self.dispatcher.run_experts(self.experts, x_Td, r.weights_TK, experts_TK)
        if self.shared_experts is not None:
            shared = self.shared_experts(x_Td)
            y = y + (torch.sigmoid(self.shared_gate(x_Td)) * shared if self.shared_gate is not None else shared)
        aux = self._balancing(r, experts_TK, x_BSd.shape[0] if x_BSd.dim() == 3 else 1, cu_seqlens)
        return y.view_as(x_BSd), aux

    def _capacity(self, r: Routing, rows: int):
        """Capacity mode over the whole sequences: under sequence parallelism every rank
        decides on all shards' assignments (gathered) and keeps its own part."""
        sh = self.shard
        w_TK, e_TK = sh.gather_tokens(r.weights_TK.detach(), rows), sh.gather_tokens(r.experts_TK, rows)
        cap = expert_capacity(w_TK.shape[0], self.top_k, self.n_experts, self.capacity_factor)
        return sh.local_tokens(apply_capacity(w_TK, e_TK, self.n_experts, cap), rows)

    def _balancing(self, r: Routing, kept_TK, B: int, cu_seqlens: Optional[torch.Tensor]):
        """Balancing losses and router stats over the whole sequences (self.shard sums over
        the sequence-parallel group, so they equal the unsharded values)."""
        sh = self.shard
        counts = torch.bincount(r.experts_TK.flatten(), minlength=self.n_experts)  # routed choices, pre-drop
        global_counts = self.dispatcher.reduce_counts(counts)
        counts = sh.sum(counts)
        lb = load_balancing_loss(r.probs_TE, r.experts_TK, global_counts if global_counts is not None else counts,
                                 mean_probs_E=sh.token_mean(r.probs_TE))
        z = sh.token_mean(torch.logsumexp(r.logits_TE, dim=-1).pow(2))  # router_z_loss over all shards
        aux = self.aux_coef * lb + self.z_coef * z
        stats = {"lb_loss": lb.detach(), "z_loss": z.detach()}
        if self.seq_coef > 0:
            S = r.probs_TE.shape[0] // B * sh.size  # whole-sequence length
            sequences_T = sh.local_tokens(sequence_ids(B, S, cu_seqlens, r.probs_TE.device), B)
            n = None if sh.size == 1 else (B if cu_seqlens is None else cu_seqlens.numel() - 1)
            seq = sequence_balancing_loss(r.probs_TE, r.experts_TK, sequences_T, n, sh)
            aux = aux + self.seq_coef * seq
            stats["seq_loss"] = seq.detach()
        with torch.no_grad():
            p = r.probs_TE
            stats.update(counts=counts, dropped=sh.sum((kept_TK < 0).sum()), assignments=kept_TK.numel() * sh.size,
                         tokens=kept_TK.shape[0] * sh.size,
                         entropy=sh.token_mean(-(p * p.clamp_min(1e-20).log()).sum(-1)))
        self.last_stats = stats
        return aux


def moe_layers(model: nn.Module) -> list:
    """The model's MoE layers in forward order (the order of ModelOutput.moe_stats)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, counts_per_layer) -> None:
    """Aux-loss-free balancing, after each optimizer step: move every layer's
    selection bias by `bias_update_speed` towards uniform load, using that
    step's expert counts (already summed over micro-batches and ranks, so all
    ranks apply the same update and the replicated bias stays in sync)."""
    for moe, counts in zip(moe_layers(model), counts_per_layer):
        if moe.router.expert_bias is None or moe.bias_update_speed <= 0:
            continue
        load = torch.as_tensor(counts, dtype=torch.float32).to(moe.router.expert_bias.device)
        moe.router.expert_bias += moe.bias_update_speed * torch.sign(load.mean() - load)
