"""`train.py --dry-run`: parameter counts, per-GPU memory estimate, FLOPs per token,
DeepSpeed JSON.

Builds the model on the meta device, so a multi-billion-parameter config
validates on a laptop without allocating its weights. Per stage it prints the
activation memory of one micro-batch per GPU without sequence parallelism and with
the configured `deepspeed.sequence_parallel_size` (or, when that is 1, with the
largest size the heads allow), and the training FLOPs per token that the attention
pattern really costs (moetrain/flops.py) next to what full causal attention would.
"""
from __future__ import annotations

import json

import torch

from moetrain.config import TrainConfig, head_dim, validate
from moetrain.flops import attention_flops, attention_pairs, causal_pairs, dense_flops_per_token
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
    data-parallel replicas (experts: world / ep_size replicas of 1/ep_size).
    Sequence-parallel ranks count as data-parallel ranks for ZeRO."""
    w = 2 if cfg.train.precision == "bf16" else 4
    master = 12 if cfg.train.precision == "bf16" else 8
    ep = cfg.model.moe.ep_size

    def one(n: int, dp: int) -> dict:
        z = cfg.deepspeed.zero_stage
        on_gpu = 0 if cfg.deepspeed.offload_optimizer != "none" else 1
        return {"weights": n * w / (dp if z >= 3 else 1), "grads": n * w / (dp if z >= 2 else 1),
                "optimizer": n * master / (dp if z >= 1 else 1) * on_gpu}

    a, b = one(n_dense, world), one(n_expert // ep, max(1, world // ep))
    return {k: a[k] + b[k] for k in a}


def _block_elems_per_token(cfg: TrainConfig, sp: int) -> tuple[float, float, float]:
    """Elements one token keeps for backward in one block: (attention part, MLP part of a
    dense block, MLP part of an MoE block), each counting its normed input."""
    m = cfg.model
    Hq, Hkv, D, d = m.n_heads, m.n_kv_heads, head_dim(m), m.hidden_size
    qkv = (Hq + 2 * Hkv) * D
    attn = d + qkv + (Hq + Hkv) * D + Hq * D          # normed x, q/k/v, rotated q/k, output
    if sp > 1:
        attn += qkv + Hq * D                           # Ulysses all-to-all copies (heads <-> sequence)
    dense = d + 3 * m.intermediate_size                # normed x, gate, up, act
    moe = m.moe
    fe = moe.intermediate_size or m.intermediate_size
    fs = moe.shared_expert_intermediate_size or moe.n_shared_experts * fe
    # normed x, router logits + probs (fp32 ~ 2 elements each), permuted copies in and out, gate/up/act
    moe_mlp = d + 4 * moe.n_experts + 2 * moe.top_k * d + 3 * moe.top_k * fe + (3 * fs + d if fs else 0)
    return attn, dense, moe_mlp


def activation_bytes_per_gpu(cfg: TrainConfig, seq_len: int, micro_batch: int, sp: int = 1) -> float:
    """Activation memory of one micro-batch on one GPU (flash-style attention: no S^2 term).
    Under sequence parallelism (Ulysses) each GPU holds seq_len / sp tokens of every
    per-token tensor, and attention's head-sharded tensors are the same size again.
    Counts: what each block keeps for backward (memory.checkpoint: all of it, only the
    block input d per token (full), or the part not recomputed), plus one block's
    intermediates while it is recomputed, plus the chunked LM head (grad of h, fp32 grad
    of the head weight, one chunk of fp32 logits and their softmax)."""
    m, mem = cfg.model, cfg.memory
    b = 2 if cfg.train.precision == "bf16" else 4
    T = seq_len * micro_batch / sp
    attn, dense, moe = _block_elems_per_token(cfg, sp)
    mode = resolve_checkpoint_mode(cfg)
    if mem.mlp_tile_tokens:   # tiled MLP: only its input is kept, one tile is alive at a time
        dense, moe = m.hidden_size, m.hidden_size
    resid = 2 * m.hidden_size  # block input and the mid-block residual
    n_moe = m.n_layers - m.moe.first_k_dense if m.moe.n_experts else 0
    stored_full = {"none": lambda mlp: resid + attn + mlp, "full": lambda mlp: m.hidden_size,
                   "attention": lambda mlp: resid + mlp, "mlp": lambda mlp: resid + attn}[mode]
    every = max(1, mem.checkpoint_every)
    stored = 0.0
    for li in range(m.n_layers):
        mlp = moe if li >= m.n_layers - n_moe else dense
        kept = stored_full(mlp) if li % every == 0 else resid + attn + mlp
        stored += m.hidden_size if mem.offload else kept   # offload: only the residual stream stays
    peak_block = resid + attn + max(moe if n_moe else 0, dense if n_moe < m.n_layers else 0)
    head = T * m.hidden_size * b * 2 + m.vocab_size * m.hidden_size * 4 + 2 * m.loss_chunk_size * m.vocab_size * 4
    return T * b * (stored + peak_block) + head


def suggested_sp(cfg: TrainConfig, world: int) -> int:
    """The largest sequence-parallel size that divides the world and both head counts."""
    m = cfg.model
    return max(s for s in range(1, world + 1) if world % s == 0 and m.n_heads % s == 0 and m.n_kv_heads % s == 0)


def flops_rows(cfg: TrainConfig, counts: dict, plans) -> list:
    """Per stage: training FLOPs per token with the stage's pattern and with full causal
    attention (one document per sequence: window mode, or packed without doc masking)."""
    m, rows = cfg.model, []
    dense = dense_flops_per_token(m, counts)
    for p in plans:
        pat = attention_flops(m, attention_pairs(m, [p.seq_len], p.attention)) / p.seq_len
        causal = attention_flops(m, causal_pairs(m, [p.seq_len])) / p.seq_len
        rows.append({"stage": p.name, "seq_len": p.seq_len, "tflop_per_token": round((dense + pat) / 1e12, 6),
                     "tflop_per_token_full_causal": round((dense + causal) / 1e12, 6),
                     "attention_share": round(pat / (dense + pat), 4)})
    return rows


def memory_rows(cfg: TrainConfig, plans, states: dict, sp: int) -> list:
    """Per stage: activations (and total with the model states) per GPU, GiB, at sp 1 and `sp`."""
    rows = []
    for p in plans:
        row = {"stage": p.name, "seq_len": p.seq_len, "micro_batch_size": p.micro_batch_size}
        for s in sorted({1, sp}):
            act = activation_bytes_per_gpu(cfg, p.seq_len, p.micro_batch_size, s)
            row[f"activations_sp{s}"] = round(act / GiB, 2)
            row[f"total_sp{s}"] = round((sum(states.values()) + act) / GiB, 2)
        rows.append(row)
    return rows


def _print_tables(mem_rows: list, sp: int, flops: list, configured: bool) -> None:
    how = "deepspeed.sequence_parallel_size" if configured else "largest size the heads allow, not configured"
    print(f"activations per GPU (estimate, GiB; sp = sequence-parallel size, sp={sp}: {how}):")
    cols = sorted({1, sp})
    head = "".join(f"{f'act sp={s}':>12}{f'total sp={s}':>14}" for s in cols)
    print(f"  {'stage':<12}{'seq_len':>9}{'mbs':>5}" + head)
    for r in mem_rows:
        print(f"  {r['stage']:<12}{r['seq_len']:>9}{r['micro_batch_size']:>5}" + "".join(
            f"{r[f'activations_sp{s}']:>12}{r[f'total_sp{s}']:>14}" for s in cols))
    print("training FLOPs per token (attention as the pattern computes it, vs full causal over S):")
    for r in flops:
        print(f"  {r['stage']:<12}{r['seq_len']:>9}  {r['tflop_per_token'] * 1e3:.3f} GFLOP"
              f"  (full causal {r['tflop_per_token_full_causal'] * 1e3:.3f};"
              f" attention {100 * r['attention_share']:.1f}%)")


def dry_run(cfg: TrainConfig, world_size: int | None = None) -> dict:
    world = world_size or 8
    validate(cfg, world)
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = model.param_counts()
    n_expert, n_dense = _split_params(model)
    sp_cfg = cfg.deepspeed.sequence_parallel_size
    dp = world // sp_cfg
    plans = plan_stages(cfg, dp)
    states = state_bytes_per_gpu(cfg, n_dense, n_expert, world)
    act = max(activation_bytes_per_gpu(cfg, p.seq_len, p.micro_batch_size, sp_cfg) for p in plans)
    sp = sp_cfg if sp_cfg > 1 else suggested_sp(cfg, world)
    mem_rows, flops = memory_rows(cfg, plans, states, sp), flops_rows(cfg, counts, plans)
    report = {
        "params_total": counts["total"], "params_active": counts["active"],
        "world_size": world, "sequence_parallel_size": sp_cfg,
        "memory_per_gpu_gib": {**{k: round(v / GiB, 2) for k, v in states.items()},
                               "activations": round(act / GiB, 2),
                               "total": round((sum(states.values()) + act) / GiB, 2)},
        "activations_by_stage": mem_rows, "flops_by_stage": flops,
        "stages": [{"name": p.name, "seq_len": p.seq_len, "steps": p.steps, "micro_batch_size": p.micro_batch_size,
                    "grad_accum_steps": p.grad_accum_steps, "rope": p.rope.type} for p in plans],
        # DeepSpeed sees every rank as data-parallel (SP ranks included: ParallelDims.zero_world)
        "deepspeed": derive_deepspeed_config(cfg, world, plans[0].micro_batch_size, plans[0].grad_accum_steps),
    }
    print(f"parameters: total {counts['total'] / 1e9:.3f} B, active per token {counts['active'] / 1e9:.3f} B")
    print(f"memory per GPU (estimate, {world} GPUs, sequence parallel {sp_cfg}, largest stage): " + ", ".join(
        f"{k} {v} GiB" for k, v in report["memory_per_gpu_gib"].items()))
    _print_tables(mem_rows, sp, flops, sp_cfg > 1)
    print(json.dumps({"stages": report["stages"], "deepspeed": report["deepspeed"]}, indent=1))
    return report
