"""Stage plan (the context curriculum) and the per-stage LR schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

from moetrain.config import (AttentionConfig, DataConfig, RopeConfig, TrainConfig, grad_accum_for,
                             stage_attention, stage_data)


@dataclass
class StagePlan:
    index: int
    name: str
    seq_len: int
    steps: int                 # optimizer steps in this stage (before the global max_steps cap)
    micro_batch_size: int
    grad_accum_steps: int
    lr: float
    warmup_steps: int
    rope: RopeConfig
    original_max_position_embeddings: int   # context the RoPE scaling extends from
    attention: AttentionConfig
    data: DataConfig

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum_steps


def plan_stages(cfg: TrainConfig, dp_world: int = 1) -> list[StagePlan]:
    """Resolve every stage: steps from tokens, batch sizes keeping tokens per
    micro-batch constant, RoPE inheriting the previous stage's context."""
    base = cfg.stages[0]
    base_tokens = base.seq_len * cfg.train.micro_batch_size
    plans, prev_len = [], base.seq_len
    train_ga = grad_accum_for(cfg.train, dp_world)  # given, or from train.global_batch_size
    for i, s in enumerate(cfg.stages):
        mbs = s.micro_batch_size or max(1, base_tokens // s.seq_len)
        ga = s.grad_accum_steps or train_ga
        per_step = s.seq_len * mbs * ga * dp_world
        steps = s.steps if s.steps is not None else max(1, math.ceil(s.tokens / per_step))
        rope = s.rope or cfg.model.rope
        orig = rope.original_max_position_embeddings or (prev_len if i > 0 else s.seq_len)
        plans.append(StagePlan(
            index=i, name=s.name, seq_len=s.seq_len, steps=steps, micro_batch_size=mbs,
            grad_accum_steps=ga, lr=s.lr if s.lr is not None else cfg.optim.lr,
            warmup_steps=s.warmup_steps if s.warmup_steps is not None else cfg.optim.warmup_steps,
            rope=rope, original_max_position_embeddings=orig,
            attention=stage_attention(cfg, s), data=stage_data(cfg, s)))
        prev_len = s.seq_len
    return plans


def total_steps(plans: list[StagePlan], max_steps: int | None) -> int:
    n = sum(p.steps for p in plans)
    return min(n, max_steps) if max_steps else n


def lr_at(step_in_stage: int, plan: StagePlan, schedule: str, min_lr_ratio: float,
          decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    """Linear warmup (re-warmup at every stage start), then cosine/linear decay
    to min_lr_ratio x peak at the stage's last step, constant, or WSD."""
    peak, warm, n = plan.lr, plan.warmup_steps, plan.steps
    if warm and step_in_stage < warm:
        return peak * (step_in_stage + 1) / warm
    if schedule == "wsd":
        return peak * wsd_factor(step_in_stage, n, warm, min_lr_ratio, decay_fraction, decay_shape)
    if schedule == "constant" or n <= warm:
        return peak
    frac = min(1.0, (step_in_stage - warm) / max(1, n - warm - 1))
    if schedule == "linear":
        decay = 1.0 - frac
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * frac))
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * decay)


def wsd_decay_start(n: int, warm: int, decay_fraction: float) -> int:
    """First step of the decay phase: the last ceil(decay_fraction x n) steps of the
    stage, never inside the warmup."""
    return max(warm, n - max(1, math.ceil(decay_fraction * n)))


def wsd_factor(step: int, n: int, warm: int, min_lr_ratio: float, decay_fraction: float, shape: str) -> float:
    """Warmup-stable-decay (MiniCPM): peak on the plateau after warmup, then a decay
    that reaches min_lr_ratio exactly at the stage's last step (step n - 1)."""
    start = wsd_decay_start(n, warm, decay_fraction)
    if step < start:
        return 1.0
    frac = min(1.0, (step - start + 1) / max(1, n - start))
    decay = 1.0 - math.sqrt(frac) if shape == "1-sqrt" else 1.0 - frac
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay
