"""`train.py --dry-run`: parameter counts, per-GPU memory estimate, DeepSpeed JSON.

Builds the model on the meta device, so a multi-billion-parameter config
validates on a laptop without allocating its weights.
"""
from __future__ import annotations

import json

import torch

from moetrain.config import TrainConfig, head_dim, validate
from moetrain.model import build_model
from moetrain.parallel.engine import derive_deepspeed_config
from moetrain.parallel.memory import resolve_checkpoint_mode
from moetrain.train.schedule import plan_stages

GiB = 1024**3


def _split_params(model) -> tuple[int, int]:
    """(expert params, everything else)."""
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return expert, sum(p.numel() for p in model.parameters()) - expert


def state_bytes_per_gpu(cfg: TrainConfig, n_dense: int, n_expert: int, world: int) -> dict:
    """Mixed-precision Adam: weights and grads in the training dtype, fp32 master
    copy + two moments (12 B/param), sharded per ZeRO stage over each group's
    data-parallel replicas (experts: world / ep_size replicas of 1/ep_size)."""
    w = 2 if cfg.train.precision == "bf16" else 4
    master = 12 if cfg.train.precision == "bf16" else 8
    ep = cfg.model.moe.ep_size

    def one(n: int, dp: int) -> dict:
        z = cfg.deepspeed.zero_stage
        return {"weights": n * w / (dp if z >= 3 else 1), "grads": n * w / (dp if z >= 2 else 1),
                "optimizer": n * master / (dp if z >= 1 else 1) * (0 if cfg.deepspeed.offload_optimizer != "none" else 1)}

    a, b = one(n_dense, world), one(n_expert // ep, max(1, world // ep))
    return {k: a[k] + b[k] for k in a}


def activation_bytes_per_gpu(cfg: TrainConfig, seq_len: int, micro_batch: int) -> float:
    """Rough per-GPU activation memory of one micro-batch (flash-style attention, no
    S^2 term): stored inputs of every block (checkpointing) or ~all intermediates."""
    m = cfg.model
    bytes_el = 2 if cfg.train.precision == "bf16" else 4
    tokens = seq_len * micro_batch
    f = (m.moe.intermediate_size or m.intermediate_size) * max(1, m.moe.top_k) if m.moe.n_experts else m.intermediate_size
    per_layer = tokens * bytes_el * (6 * m.hidden_size + 4 * m.n_heads * head_dim(m) + 4 * f)
    if resolve_checkpoint_mode(cfg) == "full":
        per_layer_stored = tokens * bytes_el * m.hidden_size
        return m.n_layers * per_layer_stored + per_layer
    return m.n_layers * per_layer + tokens * 4 * 2 * m.hidden_size


def dry_run(cfg: TrainConfig, world_size: int | None = None) -> dict:
    world = world_size or 8
    validate(cfg, world)
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = model.param_counts()
    n_expert, n_dense = _split_params(model)
    plans = plan_stages(cfg, world)
    states = state_bytes_per_gpu(cfg, n_dense, n_expert, world)
    act = max(activation_bytes_per_gpu(cfg, p.seq_len, p.micro_batch_size) for p in plans)
    report = {
        "params_total": counts["total"], "params_active": counts["active"],
        "world_size": world,
        "memory_per_gpu_gib": {**{k: round(v / GiB, 2) for k, v in states.items()},
                               "activations": round(act / GiB, 2),
                               "total": round((sum(states.values()) + act) / GiB, 2)},
        "stages": [{"name": p.name, "seq_len": p.seq_len, "steps": p.steps, "micro_batch_size": p.micro_batch_size,
                    "grad_accum_steps": p.grad_accum_steps, "rope": p.rope.type} for p in plans],
        "deepspeed": derive_deepspeed_config(cfg, world, plans[0].micro_batch_size, plans[0].grad_accum_steps),
    }
    print(f"parameters: total {counts['total'] / 1e9:.3f} B, active per token {counts['active'] / 1e9:.3f} B")
    print(f"memory per GPU (estimate, {world} GPUs): " + ", ".join(
        f"{k} {v} GiB" for k, v in report["memory_per_gpu_gib"].items()))
    print(json.dumps({"stages": report["stages"], "deepspeed": report["deepspeed"]}, indent=1))
    return report
