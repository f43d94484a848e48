"""The training loop: stages in order, DeepSpeed steps, logging, checkpoints."""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from moetrain.config import ConfigError, TrainConfig, config_from_dict, dump_yaml, to_dict, validate
from moetrain.model import build_model
from moetrain.parallel.engine import build_engine, device_for, init_distributed, set_engine_batch
from moetrain.train import checkpoint as ckpt
from moetrain.model.moe import update_expert_bias
from moetrain.parallel.expert_parallel import is_expert_param
from moetrain.train.metrics import (MetricsLogger, RouterMonitor, add_router_stats, device_peak_flops,
                                    reduce_router_stats, router_counts)
from moetrain.train.schedule import StagePlan, lr_at, plan_stages, total_steps


@dataclass
class TrainState:
    step: int = 0              # optimizer steps over all stages
    stage: int = 0             # index into the stage plan
    step_in_stage: int = 0
    tokens: int = 0            # tokens seen over all ranks
    wandb_id: Optional[str] = None
    loader_state: Optional[dict] = None   # this rank's loader state (current stage)
    history: list = field(default_factory=list)


@dataclass
class Context:
    cfg: TrainConfig
    run_dir: str
    rank: int
    world: int
    device: torch.device
    plans: list
    total: int
    start_time: float = field(default_factory=time.time)
    router_monitor: RouterMonitor = field(default_factory=RouterMonitor)  # MoE router health window (issue 3)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: TrainConfig, run_dir: str, resume: str, overwrite: bool, rank: int) -> Optional[str]:
    """Checks the resume policy and returns the checkpoint to resume from (or None).
    Raises ValueError before anything is written when the request would lose work."""
    root = os.path.join(run_dir, "checkpoints")
    existing = ckpt.list_complete(root)
    if resume == "never":
        if existing and not overwrite:
            raise ValueError(f"{run_dir} already holds checkpoints; use --resume auto to continue, "
                             "--overwrite to start over, or another --run-dir")
        if existing and rank == 0:
            shutil.rmtree(root)
            for name in ("metrics.jsonl", "config.yaml"):
                if os.path.exists(os.path.join(run_dir, name)):
                    os.remove(os.path.join(run_dir, name))
        return None
    if resume == "auto":
        return existing[-1] if existing else None
    if not (os.path.isdir(resume) and ckpt.is_complete(resume)):
        raise ValueError(f"--resume {resume} is not a complete checkpoint folder (no {ckpt.MARKER} marker); "
                         "give checkpoints/<tag> of a run, or --resume auto")
    return resume


def check_same_model(cfg: TrainConfig, ckpt_dir: str) -> None:
    saved = ckpt.read_client_state(ckpt_dir)["config"]["model"]
    now = to_dict(cfg.model)
    diff = [k for k in now if k not in ("attention", "rope", "activation_checkpointing", "loss_chunk_size",
                                        "init_from") and now[k] != saved.get(k)]
    if diff:
        raise ValueError(f"checkpoint {ckpt_dir} has a different model.{diff[0]} ({saved.get(diff[0])!r} vs "
                         f"{now[diff[0]]!r}); use the run's config.yaml or a new --run-dir")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill derived defaults so config.yaml records exactly what ran."""
    d = to_dict(cfg)
    if d["model"]["max_position_embeddings"] is None:
        d["model"]["max_position_embeddings"] = max(s["seq_len"] for s in d["stages"])
    return config_from_dict(d)


def setup(cfg: TrainConfig, run_dir: str, resume: str, overwrite: bool, local_rank=None):
    rank, world, local = init_distributed(local_rank)
    validate(cfg, world)
    cfg = resolve_config(cfg)
    resume_from = prepare_run_dir(cfg, run_dir, resume, overwrite, rank)
    if resume_from:
        check_same_model(cfg, resume_from)
    plans = plan_stages(cfg, world)
    ctx = Context(cfg, run_dir, rank, world, device_for(local), plans, total_steps(plans, cfg.train.max_steps))
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))
    _prepare_data(ctx)
    return ctx, resume_from


def _prepare_data(ctx: Context) -> None:
    from moetrain.data import ensure_prepared, load_tokenizer
    if ctx.rank == 0:
        for plan in ctx.plans:
            ensure_prepared(plan.data)
    ckpt.barrier()
    vocab = load_tokenizer(ctx.plans[0].data.dir).vocab_size
    if vocab > ctx.cfg.model.vocab_size:
        raise ConfigError(f"tokenizer in {ctx.plans[0].data.dir} has {vocab} pieces but model.vocab_size="
                          f"{ctx.cfg.model.vocab_size}; set model.vocab_size >= {vocab}")


def enter_stage(model, engine, plan: StagePlan, world: int) -> None:
    model.set_rope(dataclasses.replace(plan.rope,
                                       original_max_position_embeddings=plan.original_max_position_embeddings),
                   plan.seq_len)
    model.set_attention(plan.attention)
    set_engine_batch(engine, plan.micro_batch_size, plan.grad_accum_steps, world)


def make_loader(ctx: Context, plan: StagePlan, split: str = "train"):
    from moetrain.data import TokenLoader
    return TokenLoader(plan.data, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
                       dp_rank=ctx.rank, dp_world=ctx.world, seed=ctx.cfg.seed + 1000 * plan.index, split=split,
                       doc_masking=plan.attention.doc_masking)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_step(engine, loader, plan: StagePlan, device) -> dict:
    """One optimizer step = grad_accum micro-batches; returns step sums."""
    sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "tokens": 0, "grad_norm": None}
    router = None
    for micro in range(plan.grad_accum_steps):
        batch = _to_device(loader.next_batch(), device)
        out = engine(**batch)
        engine.backward(out.loss)
        if micro == plan.grad_accum_steps - 1 and not engine.zero_optimization():
            # DeepSpeed only records the norm inside its ZeRO / bf16 / fp16 optimizers; the
            # plain fp32 path clips without keeping it. Pre-clip norm, as those report.
            sums["grad_norm"] = grad_norm(engine.module)
        engine.step()
        sums["loss"] += float(out.loss.detach())
        sums["lm_loss"] += float(out.lm_loss.detach())
        sums["aux_loss"] += float(out.aux_loss.detach())
        sums["tokens"] += int((batch["labels"] != -100).sum())
        router = add_router_stats(router, out.moe_stats)  # MoE router stats, summed (issue 3)
    for k in ("loss", "lm_loss", "aux_loss"):
        sums[k] /= plan.grad_accum_steps
    sums["router"] = router or []
    return sums


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the (already data-parallel reduced) gradients. Dense gradients are
    equal on every rank; under expert parallelism each rank holds other experts, so their
    squared sums are added over the expert-parallel group. One host sync."""
    grads = {True: [], False: []}  # is_expert -> per-parameter norms, kept on the device
    for p in model.parameters():
        if p.grad is not None:
            grads[is_expert_param(p)].append(p.grad.detach().float().norm().double())
    device = next(model.parameters()).device
    dense, expert = (torch.stack(g).pow(2).sum() if g else torch.zeros((), dtype=torch.float64, device=device)
                     for g in (grads[False], grads[True]))
    groups = getattr(model, "ep_groups", None)
    if groups is not None and groups.ep_size > 1:
        dist.all_reduce(expert, group=groups.ep_group)
    return float((dense + expert).sqrt())


def _reduce(sums: dict, world: int) -> dict:
    """Mean losses and summed tokens/expert counts over data-parallel ranks."""
    if world == 1:
        return sums
    vec = torch.tensor([sums["loss"], sums["lm_loss"], sums["aux_loss"], float(sums["tokens"])],
                       dtype=torch.float64)
    dist.all_reduce(vec)
    out = dict(sums, loss=float(vec[0]) / world, lm_loss=float(vec[1]) / world,
               aux_loss=float(vec[2]) / world, tokens=int(vec[3]))
    out["router"] = reduce_router_stats(sums["router"])  # MoE router stats summed over ranks (issue 3)
    return out


@torch.no_grad()
def eval_loss(engine, ctx: Context, plan: StagePlan) -> float:
    """Mean held-out LM loss over train.eval_batches micro-batches of the eval split."""
    loader = make_loader(ctx, dataclasses.replace(plan, data=dataclasses.replace(plan.data, split="eval")),
                         split="eval")
    engine.eval()
    total = 0.0
    for _ in range(ctx.cfg.train.eval_batches):
        total += float(engine(**_to_device(loader.next_batch(), ctx.device)).lm_loss)
    engine.train()
    vec = torch.tensor([total / ctx.cfg.train.eval_batches], dtype=torch.float64)
    if ctx.world > 1:
        dist.all_reduce(vec)
    return float(vec[0]) / ctx.world


def stage_end_eval(engine, ctx: Context, state: TrainState, plan: StagePlan, event: str, logger) -> dict:
    """Held-out loss, then (eval.enabled) the long-context evaluation of
    moetrain.eval. Every rank runs the same forwards (ZeRO-3 gathers
    collectively); rank 0 writes RUN_DIR/eval/<stage>/."""
    ev = {"step": state.step, "stage": plan.name, "event": event, "eval_loss": eval_loss(engine, ctx, plan)}
    if ctx.cfg.eval.enabled:
        from moetrain.eval import evaluate_stage

        def forward(input_ids, position_ids=None):
            with torch.no_grad():
                return engine(input_ids.to(ctx.device), position_ids=position_ids).logits.float().cpu()

        engine.eval()
        ev.update(evaluate_stage(forward, ctx.cfg, plan, os.path.join(ctx.run_dir, "eval", plan.name),
                                 write=ctx.rank == 0, wandb_run=logger.wandb))
        engine.train()
    return ev


def save_checkpoint(engine, ctx: Context, state: TrainState, loader) -> str:
    client = {"step": state.step, "stage": state.stage, "step_in_stage": state.step_in_stage,
              "tokens": state.tokens, "wandb_id": state.wandb_id, "world_size": ctx.world,
              "stage_name": ctx.plans[state.stage].name, "config": to_dict(ctx.cfg),
              "history": state.history}
    rank_state = {"loader": loader.state_dict() if loader is not None else None}
    return ckpt.save(engine, os.path.join(ctx.run_dir, "checkpoints"), state.step, client, rank_state,
                     ctx.rank, ctx.cfg.checkpoint.keep_last)


def restore(engine, ctx: Context, ckpt_dir: str) -> TrainState:
    client, rank_state = ckpt.load(engine, ckpt_dir, ctx.rank, ctx.world)
    state = TrainState(step=client["step"], stage=client["stage"], step_in_stage=client["step_in_stage"],
                       tokens=client["tokens"], wandb_id=client.get("wandb_id"),
                       loader_state=rank_state.get("loader"), history=client.get("history", []))
    if ctx.rank == 0:
        _truncate_metrics(os.path.join(ctx.run_dir, "metrics.jsonl"), state.step)
    return state


def _truncate_metrics(path: str, step: int) -> None:
    """Drop records past the resumed step (they were written by the killed run
    and are about to be recomputed), so metrics.jsonl stays one line per step."""
    import json
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _grad_norm_of(engine, sums: dict) -> Optional[float]:
    """Norm of this step's gradients: DeepSpeed's when its optimizer keeps one, else ours
    (None only if neither exists, never a made-up 0)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = sums.get("grad_norm")
    return None if norm is None else float(norm)


def _log_record(ctx, state, plan, sums, lr, dt, engine, model, peak) -> dict:
    tps = sums["tokens"] / max(dt, 1e-9)
    rec = {"step": state.step, "stage": plan.name, "loss": sums["loss"], "lm_loss": sums["lm_loss"],
           "aux_loss": sums["aux_loss"], "lr": lr, "tokens": state.tokens, "tokens_per_s": tps,
           "grad_norm": _grad_norm_of(engine, sums), "seq_len": plan.seq_len,
           "mfu": model.flops_per_token(plan.seq_len) * tps / (peak * ctx.world),
           "elapsed_s": time.time() - ctx.start_time}
    rec.update(ctx.router_monitor.flush())  # MoE router health over the logging window (issue 3)
    return rec


def run_stage(engine, model, ctx: Context, state: TrainState, plan: StagePlan, logger, peak) -> None:
    cfg = ctx.cfg
    enter_stage(model, engine, plan, ctx.world)
    loader = make_loader(ctx, plan)
    if state.loader_state is not None:
        loader.load_state_dict(state.loader_state)
        state.loader_state = None
    while state.step_in_stage < plan.steps and state.step < ctx.total:
        lr = lr_at(state.step_in_stage, plan, cfg.optim.schedule, cfg.optim.min_lr_ratio)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        sums = _reduce(train_step(engine, loader, plan, ctx.device), ctx.world)
        ctx.router_monitor.observe(sums["router"])  # MoE (issue 3): health window
        update_expert_bias(model, router_counts(sums["router"]))  # MoE (issue 3): aux-loss-free balancing
        dt = time.perf_counter() - t0
        state.step += 1
        state.step_in_stage += 1
        state.tokens += sums["tokens"]
        if state.step % cfg.logging.every_steps == 0 or state.step == 1:
            logger.log(_log_record(ctx, state, plan, sums, lr, dt, engine, model, peak))
        if cfg.train.eval_every_steps and state.step % cfg.train.eval_every_steps == 0:
            logger.event({"step": state.step, "stage": plan.name, "eval_loss": eval_loss(engine, ctx, plan)})
        if state.step % cfg.checkpoint.every_steps == 0 and state.step < ctx.total:
            save_checkpoint(engine, ctx, state, loader)
    stage_done = state.step_in_stage >= plan.steps
    if stage_done or state.step >= ctx.total:
        ev = stage_end_eval(engine, ctx, state, plan, "stage_end" if stage_done else "run_end", logger)
        state.history.append(ev)
        logger.event(ev)
    if stage_done and state.stage + 1 < len(ctx.plans):
        state.stage += 1
        state.step_in_stage = 0
    if state.step >= ctx.total:
        save_checkpoint(engine, ctx, state, loader if not stage_done else None)


def train(cfg: TrainConfig, run_dir: str, resume: str = "auto", overwrite: bool = False,
          local_rank: Optional[int] = None) -> TrainState:
    """Run every stage of `cfg` in `run_dir`; resumable at any checkpoint."""
    ctx, resume_from = setup(cfg, run_dir, resume, overwrite, local_rank)
    cfg = ctx.cfg
    _seed_everything(cfg.seed)
    model = build_model(cfg.model)
    if cfg.model.init_from and resume_from is None:
        from moetrain.export import init_from
        init_from(model, cfg.model.init_from)  # before build_engine shards experts
    if cfg.train.precision == "fp32":
        model = model.float()
    plan0 = ctx.plans[0]
    engine = build_engine(model, cfg, ctx.world, plan0.micro_batch_size, plan0.grad_accum_steps)
    state = restore(engine, ctx, resume_from) if resume_from else TrainState()
    logger = MetricsLogger(cfg, run_dir, ctx.rank, ctx.total, state.step, state.wandb_id)
    state.wandb_id = logger.wandb_id
    peak = device_peak_flops(ctx.device)
    try:
        while state.stage < len(ctx.plans) and state.step < ctx.total:
            run_stage(engine, model, ctx, state, ctx.plans[state.stage], logger, peak)
        # Rank 0 exports from the final checkpoint (complete: saving ends in a barrier) while the
        # other ranks leave: no collective waits on it, so a long CPU export or --verify cannot
        # run into the process-group timeout. Launchers wait for every rank anyway.
        if cfg.export.enabled and ctx.rank == 0:
            from moetrain.export import export_checkpoint
            e = cfg.export
            export_checkpoint(run_dir, os.path.join(run_dir, "export"), dtype=e.dtype, shard_size=e.shard_size,
                              verify=e.verify, allow_approx=e.allow_approx)
    finally:
        logger.finish()
    return state
