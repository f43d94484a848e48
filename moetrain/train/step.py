"""One optimizer step through the DeepSpeed engine: grad_accum micro-batches of
forward + backward, the pre-clip gradient norm, the optimizer step.

Nothing here copies to the host: losses, token counts, the gradient norm and
router statistics stay device tensors in `StepMetrics`, and the Trainer reduces
and syncs them once per logging interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from moetrain.parallel.expert_parallel import is_expert_param
from moetrain.train.metrics import add_router_stats


@dataclass
class StepMetrics:
    """This rank's sums of one optimizer step (device tensors, float64 unless noted)."""
    loss: torch.Tensor                 # mean over micro-batches: LM loss + weighted aux losses
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    tokens: torch.Tensor               # int64: label positions (not -100) of this rank
    grad_norm: Optional[torch.Tensor]  # our pre-clip norm where DeepSpeed keeps none (ZeRO-0), else None
    router: Optional[torch.Tensor]     # [L, E + n] packed router stats (moetrain.train.metrics), or None


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_step(engine, loader, grad_accum_steps: int, device, ep_group=None,
               post_backward: Optional[Callable[[torch.Tensor], bool]] = None) -> StepMetrics:
    """One optimizer step of `grad_accum_steps` micro-batches from `loader`.
    `post_backward(loss)` runs once the step's gradients are complete, before the
    optimizer steps, with the step's mean loss so far (device tensor); when it
    returns True the update is skipped (skip_update). `ep_group` adds expert
    gradients over expert parallelism to the norm."""
    zero = lambda dtype=torch.float64: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
    loss, lm_loss, aux_loss, tokens = zero(), zero(), zero(), zero(torch.int64)
    norm, router = None, None
    for micro in range(grad_accum_steps):
        batch = _to_device(loader.next_batch(), device)
        out = engine(**batch)
        engine.backward(out.loss)
        loss += out.loss.detach().double()
        skip = False
        if micro == grad_accum_steps - 1:
            if post_backward is not None:
                skip = bool(post_backward(loss / grad_accum_steps))
            if not engine.zero_optimization():
                # DeepSpeed only records the norm inside its ZeRO / bf16 / fp16 optimizers; the
                # plain fp32 path clips without keeping it. Pre-clip norm, as those report.
                norm = grad_norm(engine.module, ep_group)
        if skip:
            skip_update(engine)
        else:
            engine.step()
        lm_loss += out.lm_loss.detach().double()
        aux_loss += out.aux_loss.detach().double()
        tokens += (batch["labels"] != -100).sum()
        router = add_router_stats(router, out.moe_stats)
    n = grad_accum_steps
    return StepMetrics(loss / n, lm_loss / n, aux_loss / n, tokens, norm, router)


def skip_update(engine) -> None:
    """End the optimizer step without changing weights or optimizer state, every rank
    alike. engine.step() still runs, so DeepSpeed's micro-step bookkeeping, gradient
    clearing and counters stay as after a normal step (our step counters and LR live in
    the Trainer and advance as usual, so a resume is exact). Under ZeRO-1/2 the update is
    dropped through DeepSpeed's own overflow path (it clears the partitioned gradients and
    counts engine.skipped_steps); elsewhere the wrapped optimizer's step is a no-op for
    this one call (engine.step() zeroes the gradients afterwards)."""
    opt = engine.optimizer
    if engine.zero_optimization() and hasattr(opt, "check_overflow"):
        patch = {"check_grad_overflow": True,
                 "check_overflow": lambda partition_gradients=True: setattr(opt, "overflow", True)}
    else:
        patch = {"step": lambda closure=None: None}
    missing = object()
    saved = {k: opt.__dict__.get(k, missing) for k in patch}
    opt.__dict__.update(patch)
    try:
        engine.step()
    finally:
        for k, v in saved.items():
            if v is missing:
                del opt.__dict__[k]
            else:
                opt.__dict__[k] = v


def any_nonfinite(loss: torch.Tensor, engine) -> torch.Tensor:
    """1 (int32 device scalar) when this rank's loss or any gradient it holds is NaN/Inf.
    Under ZeRO-1/2 the reduced gradients live in DeepSpeed's partitions (module .grad is
    None), so those are checked with DeepSpeed's own local scan; no collective here."""
    bad = ~torch.isfinite(loss.detach())
    for p in engine.module.parameters():
        if p.grad is not None:
            bad = bad | ~torch.isfinite(p.grad.detach()).all()
    opt = engine.optimizer
    if engine.zero_optimization() and getattr(opt, "averaged_gradients", None):
        # a device tensor at ZeRO-1/2, a Python bool (host scan) at ZeRO-3
        bad = bad | torch.as_tensor(opt.has_overflow_partitioned_grads_serial(), device=bad.device).reshape(()).bool()
    return bad.to(torch.int32)


def grad_norm(model: torch.nn.Module, ep_group=None) -> torch.Tensor:
    """Global L2 norm (float64, on the device) of the already data-parallel reduced
    gradients. Dense gradients are equal on every rank; under expert parallelism
    each rank holds other experts, so their squared sums are added over `ep_group`."""
    grads = {True: [], False: []}  # is_expert -> per-parameter norms
    for p in model.parameters():
        if p.grad is not None:
            grads[is_expert_param(p)].append(p.grad.detach().float().norm().double())
    device = next(model.parameters()).device
    dense, expert = (torch.stack(g).pow(2).sum() if g else torch.zeros((), dtype=torch.float64, device=device)
                     for g in (grads[False], grads[True]))
    if ep_group is not None:
        dist.all_reduce(expert, group=ep_group)
    return (dense + expert).sqrt()
