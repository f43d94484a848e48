"""The stock training callbacks: checkpointing, held-out evaluation, MoE router
handling. Evaluation beyond the held-out loss and export live in moetrain.eval and
moetrain.export; the composition root (moetrain/compose.py) plugs them in."""
from __future__ import annotations

import torch

from moetrain import checkpoint as ckpt
from moetrain.model.moe import moe_layers, update_expert_bias
from moetrain.train.callback import Callback
from moetrain.train.metrics import RouterMonitor, reduce_router_stats, router_counts


class CheckpointCallback(Callback):
    """Every checkpoint.every_steps (before the last step) and once at the end of
    training: RUN_DIR/checkpoints/<tag>, newest checkpoint.keep_last kept. The save
    is collective; the format lives in moetrain.checkpoint."""

    priority = 0

    def on_train_start(self, trainer) -> None:
        self.saved_step = trainer.state.step  # resumed at the end: nothing new to save

    def post_step(self, trainer) -> None:
        step = trainer.state.step
        if trainer.reload_pending:  # a rollback (SpikeGuard) undoes this step: never save it
            return
        if step % trainer.cfg.checkpoint.every_steps == 0 and step < trainer.total:
            self.save(trainer)

    def on_train_end(self, trainer) -> None:
        if trainer.state.step > self.saved_step:  # a stop request right after a periodic save
            self.save(trainer)

    def save(self, trainer) -> str:
        path = ckpt.save(trainer.engine, ckpt.RunDir(trainer.run_dir).checkpoints, trainer.state.step,
                         trainer.client_state(), trainer.rank_state(), trainer.rank,
                         trainer.cfg.checkpoint.keep_last, trainer.parallel.ep_groups)
        self.saved_step = trainer.state.step
        trainer.dispatch("on_checkpoint", path)
        return path


@torch.no_grad()
def eval_loss(trainer, plan) -> float:
    """Mean held-out LM loss over train.eval_batches micro-batches of the eval split
    (collective: averaged over ranks)."""
    loader = trainer.make_loader(plan, split="eval")
    engine, n = trainer.engine, trainer.cfg.train.eval_batches
    engine.eval()
    total = 0.0
    for _ in range(n):
        batch = {k: (v.to(trainer.device) if torch.is_tensor(v) else v) for k, v in loader.next_batch().items()}
        total += float(engine(**batch).lm_loss)
    engine.train()
    vec = torch.tensor([total / n], dtype=torch.float64)
    if trainer.world > 1:
        torch.distributed.all_reduce(vec)
    return float(vec[0]) / trainer.world


class HeldOutEvalCallback(Callback):
    """Held-out loss every train.eval_every_steps (an event) and at every stage end
    (the first field of the stage-end record)."""

    priority = 40

    def post_step(self, trainer) -> None:
        every = trainer.cfg.train.eval_every_steps
        if every and trainer.state.step % every == 0:
            s = trainer.state
            trainer.log_event({"step": s.step, "stage": trainer.plan.name, "eval_loss": eval_loss(trainer, trainer.plan)})

    def on_stage_end(self, trainer, plan, record: dict) -> None:
        record["eval_loss"] = eval_loss(trainer, plan)


class MoERouterCallback(Callback):
    """Aux-loss-free bias update after every step (it needs the step's expert counts
    summed over ranks: one all-reduce per step, only when the bias is on), and router
    health over each logging window (reduced over ranks once, at the log step), with
    a console warning when a layer collapses."""

    priority = 200

    def __init__(self, collapse_frac: float = 0.5, patience: int = 3):
        self.monitor = RouterMonitor(collapse_frac, patience)

    def on_train_start(self, trainer) -> None:
        self.bias = any(m.router.expert_bias is not None and m.bias_update_speed > 0
                        for m in moe_layers(trainer.model))

    def post_step(self, trainer) -> None:
        stats = trainer.step_metrics.router
        if stats is None:
            return
        if self.bias and not trainer.skip_update:  # a skipped update (guards) leaves the bias too
            update_expert_bias(trainer.model, router_counts(reduce_router_stats(stats)))
        self.monitor.observe(stats)
        if trainer.is_log_step():
            trainer.record_metrics(self.monitor.flush())
