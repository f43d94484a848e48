"""Applying a stage of the context curriculum to a model: the one place that turns a
StagePlan into RoPE + attention, used by the trainer at every stage start and by
everything that loads a checkpoint (export, eval, load_model)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from moetrain.config import AttentionConfig, RopeConfig, TrainConfig

if TYPE_CHECKING:
    from moetrain.train.schedule import StagePlan

# Backend of every model loaded from a checkpoint: "auto" picks Triton on CUDA and
# SDPA / the chunked kernel on CPU, so a run trained with the CUDA-only "triton"
# backend still evaluates and exports on a CPU box (and a GPU load still gets Triton).
LOADED_BACKEND = "auto"


def stage_of(cfg: TrainConfig, client: dict) -> StagePlan:
    """The last stage that ran before `client` (a checkpoint's client_state) was saved,
    planned for the world size that trained it, exactly as the trainer entered it."""
    from moetrain.train.schedule import plan_stages  # lazy: train/ may import this package
    plans = plan_stages(cfg, max(1, client.get("world_size", 1) // cfg.deepspeed.sequence_parallel_size))
    idx = min(int(client.get("stage", len(plans) - 1)), len(plans) - 1)
    if client.get("step_in_stage") == 0 and idx > 0:
        idx -= 1  # saved right at a stage boundary: the next stage has not run a single step yet
    return plans[idx]


def stage_rope(plan: StagePlan) -> RopeConfig:
    """The stage's RoPE with the context it extends from filled in."""
    return dataclasses.replace(plan.rope, original_max_position_embeddings=plan.original_max_position_embeddings)


def apply_stage(model, plan: StagePlan, backend: Optional[str] = None) -> None:
    """Set the stage's RoPE (for its seq_len) and attention pattern on `model` in place;
    `backend` replaces the configured attention backend (LOADED_BACKEND for loaded models)."""
    model.set_rope(stage_rope(plan), plan.seq_len)
    attn = plan.attention if backend is None else dataclasses.replace(plan.attention, backend=backend)
    model.set_attention(attn)


def final_stage(cfg: TrainConfig, client: dict) -> tuple[RopeConfig, int, AttentionConfig]:
    """(RoPE, its context, attention pattern) of stage_of(cfg, client)."""
    plan = stage_of(cfg, client)
    return stage_rope(plan), plan.seq_len, plan.attention
