"""Decoder-only MoE Transformer: embeddings, pre-norm blocks, chunked LM loss.

Legend: B batch, S sequence, d width, V vocab, T = B*S tokens.
Plain PyTorch: parallelism and DeepSpeed wrap this model from outside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.config import AttentionConfig, ModelConfig, RopeConfig, head_dim
from moetrain.model.attention import Attention
from moetrain.model.loss import linear_cross_entropy
from moetrain.model.moe import MoE, SwiGLU
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import RotaryEmbedding
from moetrain.model.shard import SequenceShard


@dataclass
class ModelOutput:
    loss: Optional[torch.Tensor]      # lm_loss + weighted aux losses
    lm_loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    logits: Optional[torch.Tensor]    # None when the loss was computed chunked
    moe_stats: list = field(default_factory=list)  # per MoE layer: detached router stats


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    return cfg.moe.n_experts > 0 and layer_idx >= cfg.moe.first_k_dense


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = is_moe_layer(cfg, layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.attn_norm(x), cos, sin, cu_seqlens)
        h = self.mlp_norm(x)
        if self.is_moe:
            y, aux = self.mlp(h, cu_seqlens)
        else:
            y, aux = self.mlp(h), x.new_zeros((), dtype=torch.float32)
        return x + y, aux


class LMHead(nn.Module):
    """Output projection. Given labels it returns the cross-entropy instead of logits,
    chunked or fused (`impl`, model.loss_impl; moetrain.model.loss); the weight is only
    touched inside this module's forward, as ZeRO-3 (which gathers parameters per
    module call) requires. reduction="sum" lets a caller normalise by a global count."""

    def __init__(self, d: int, vocab_size: int, chunk: int, impl: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d))
        self.chunk = chunk
        self.impl = impl

    def forward(self, h_Td, labels_T=None, reduction: str = "mean"):
        if labels_T is None:
            return F.linear(h_Td, self.weight)
        return linear_cross_entropy(h_Td, self.weight, labels_T, chunk_size=self.chunk, impl=self.impl,
                                    reduction=reduction)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position_embeddings: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.max_position_embeddings = cfg.max_position_embeddings or max_position_embeddings or 2048
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.loss_chunk_size, cfg.loss_impl)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = RotaryEmbedding(cfg.rope, head_dim(cfg), self.max_position_embeddings)
        self.seq_shard = SequenceShard()  # whole sequences; see set_sequence_shard
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs (GPT-2)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # norm weights stay at 1
            last = name.split(".")[-1]
            is_out = "o_proj" in name or "down_proj" in name or last.startswith("down_")
            nn.init.normal_(p, 0.0, out_std if is_out else std)

    def set_rope(self, rope: RopeConfig, max_position_embeddings: int) -> None:
        """Stage transition: swap the RoPE strategy in place (no parameters change)."""
        self.max_position_embeddings = max_position_embeddings
        self.rotary.set_rope(rope, max_position_embeddings)

    def set_sequence_shard(self, shard: SequenceShard) -> None:
        """Sequence parallelism (moetrain/parallel/sequence.py): this rank's tokens are one
        contiguous shard of each sequence; the loss and MoE statistics cover all shards."""
        self.seq_shard = shard
        for layer in self.layers:
            if layer.is_moe:
                layer.mlp.shard = shard

    def set_attention(self, attn: AttentionConfig) -> None:
        for layer in self.layers:
            layer.attn.set_pattern(attn)

    def hidden_states(self, input_ids, position_ids=None, cu_seqlens=None):
        B, S = input_ids.shape
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got batch {B}")
        if position_ids is None:  # global positions: a sequence-parallel shard starts at rank * S
            start = self.seq_shard.rank * S
            position_ids = torch.arange(start, start + S, device=input_ids.device).expand(B, S)
        x = self.embed(input_ids)
        cos, sin = self.rotary(position_ids, dtype=x.dtype)
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, a = layer(x, cos, sin, cu_seqlens)  # recompute / offload: moetrain.parallel.memory
            aux = aux + a
        return self.norm(x), aux

    def forward(self, input_ids, labels=None, position_ids=None, cu_seqlens=None) -> ModelOutput:
        """labels are already aligned (labels[t] is the target of position t; -100 ignored)."""
        h, aux = self.hidden_states(input_ids, position_ids, cu_seqlens)
        stats = [l.mlp.last_stats for l in self.layers if l.is_moe]
        if labels is None:
            return ModelOutput(None, None, aux, self.lm_head(h), stats)
        sh = self.seq_shard
        if sh.size > 1:  # mean over the label tokens of all shards: local sum / global count
            lm = self.lm_head(h.reshape(-1, h.shape[-1]), labels.reshape(-1), reduction="sum")
            lm = sh.sum(lm) / sh.sum((labels != -100).sum()).clamp_min(1).to(lm.dtype)
        else:
            lm = self.lm_head(h.reshape(-1, h.shape[-1]), labels.reshape(-1))
        return ModelOutput(lm + aux.to(lm.dtype), lm, aux, None, stats)

    # ------------------------------------------------------------------ accounting
    def param_counts(self) -> dict:
        """Total and active (per-token) parameter counts of the whole model, and the
        embedding's share of both; under expert parallelism the local expert slice
        is scaled up to all experts. Counts the parameters as they are: call it on
        the plain model, before anything (ZeRO-3) partitions them."""
        total = active = sum(p.numel() for p in self.parameters())
        m = self.cfg.moe
        for layer in self.layers:
            if layer.is_moe:
                ex = layer.mlp.experts
                local = sum(p.numel() for p in ex.parameters())
                full = local * ex.n_global // ex.n_local
                total += full - local
                active += full * m.top_k // m.n_experts - local
        return {"total": total, "active": active, "embedding": self.embed.weight.numel()}

    def flops_per_token(self, seq_len: int, counts: Optional[dict] = None) -> float:
        """Training FLOPs/token: 6 x active non-embedding params (+ LM head) plus
        causal attention 6 * L * S * Hq * D (PaLM appendix B, halved for causality).
        `counts`: param_counts() taken earlier, e.g. before ZeRO-3 partitioned the model."""
        c = counts if counts is not None else self.param_counts()
        active = c["active"] - c["embedding"]
        attn = 6 * self.cfg.n_layers * seq_len * self.cfg.n_heads * head_dim(self.cfg)
        return 6 * active + attn
