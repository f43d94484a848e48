"""Mixture-of-Experts feed-forward: router, SwiGLU experts, balancing losses.

Legend: T tokens, d model width, E experts, F expert FFN width, K top-k.
The per-expert loop (`experts_loop`) is the reference; `experts_grouped`
(tokens sorted by expert, one matmul per contiguous segment) is the fast path
with the same signature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.config import ModelConfig


class SwiGLU(nn.Module):
    """Dense MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    weights_TK: torch.Tensor  # combine weights of the chosen experts
    experts_TK: torch.Tensor  # chosen expert ids (long)
    probs_TE: torch.Tensor    # full router distribution (for the balancing loss)
    logits_TE: torch.Tensor   # raw router logits (for the z-loss)


class TopKRouter(nn.Module):
    """Softmax over all experts, keep the top-k, optionally renormalise."""

    def __init__(self, d: int, n_experts: int, top_k: int, norm_topk_prob: bool = True):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(d, n_experts, bias=False)

    def forward(self, x_Td) -> Routing:
        logits = self.gate(x_Td).float()
        probs = logits.softmax(dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return Routing(w, idx, probs, logits)


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard aux loss E * sum_e f_e * P_e; equals 1 under uniform routing.

    f_e: fraction of (token, slot) assignments sent to e; P_e: mean router prob.
    """
    E = probs_TE.shape[-1]
    counts = torch.bincount(experts_TK.flatten(), minlength=E).to(probs_TE.dtype)
    f = counts / experts_TK.numel()
    return E * (f * probs_TE.mean(dim=0)).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights (grouped-matmul friendly)."""

    def __init__(self, n_experts: int, d: int, f: int):
        super().__init__()
        self.gate_EFd = nn.Parameter(torch.empty(n_experts, f, d))
        self.up_EFd = nn.Parameter(torch.empty(n_experts, f, d))
        self.down_EdF = nn.Parameter(torch.empty(n_experts, d, f))

    def expert(self, e: int, x_Td):
        h = F.silu(x_Td @ self.gate_EFd[e].t()) * (x_Td @ self.up_EFd[e].t())
        return h @ self.down_EdF[e].t()


def experts_loop(experts: Experts, x_Td, weights_TK, experts_TK):
    """Reference: for each expert, gather its tokens, run it, scatter-add back."""
    y = torch.zeros_like(x_Td)
    for e in range(experts.gate_EFd.shape[0]):
        tok, slot = (experts_TK == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        out = experts.expert(e, x_Td[tok]) * weights_TK[tok, slot, None].to(x_Td.dtype)
        y.index_add_(0, tok, out)
    return y


def experts_grouped(experts: Experts, x_Td, weights_TK, experts_TK):
    """Dropless: sort assignments by expert, run contiguous segments, combine."""
    T, K = experts_TK.shape
    E = experts.gate_EFd.shape[0]
    flat = experts_TK.flatten()
    order = flat.argsort(stable=True)
    tok = order // K
    counts = torch.bincount(flat, minlength=E).tolist()
    xs = x_Td[tok]
    outs = []
    for e, seg in enumerate(torch.split(xs, counts)):
        if seg.shape[0]:
            outs.append(experts.expert(e, seg))
    ys = torch.cat(outs) if outs else xs.new_zeros(0, x_Td.shape[1])
    ys = ys * weights_TK.flatten()[order, None].to(x_Td.dtype)
    return torch.zeros_like(x_Td).index_add_(0, tok, ys)


EXPERT_PATHS = {"loop": experts_loop, "grouped": experts_grouped}


class MoE(nn.Module):
    """Top-k routed SwiGLU experts. forward returns (y, aux_loss); `last_stats`
    keeps detached per-expert token counts for router-health metrics."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        f = m.intermediate_size or cfg.intermediate_size
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.aux_coef, self.z_coef = m.aux_loss_coef, m.z_loss_coef
        self.router = TopKRouter(cfg.hidden_size, m.n_experts, m.top_k, m.norm_topk_prob)
        self.experts = Experts(m.n_experts, cfg.hidden_size, f)
        self.path = "grouped"
        self.last_stats: dict = {}

    def forward(self, x_BSd):
        x_Td = x_BSd.reshape(-1, x_BSd.shape[-1])
        r = self.router(x_Td)
        y = EXPERT_PATHS[self.path](self.experts, x_Td, r.weights_TK, r.experts_TK)
        lb = load_balancing_loss(r.probs_TE, r.experts_TK)
        z = router_z_loss(r.logits_TE)
        with torch.no_grad():
            self.last_stats = {
                "counts": torch.bincount(r.experts_TK.flatten(), minlength=self.n_experts),
                "lb_loss": lb.detach(), "z_loss": z.detach(),
                "entropy": -(r.probs_TE * r.probs_TE.clamp_min(1e-20).log()).sum(-1).mean(),
            }
        return y.view_as(x_BSd), self.aux_coef * lb + self.z_coef * z
