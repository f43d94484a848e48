"""The metrics collector built into the Trainer: on a log step it reduces the step's
device tensors over the ranks in one all-reduce, copies them to the host once,
adds what other callbacks recorded (trainer.record_metrics) and hands the record
to every callback's `log_metrics` on rank 0. On other steps it does nothing, so
a non-logging step makes no host sync unless a callback asks for one."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from moetrain.flops import PairCounter, attention_flops, dense_flops_per_token
from moetrain.train.callback import Callback
from moetrain.train.metrics import device_peak_flops


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (collective); unchanged in a world of one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


class MetricsCollector(Callback):
    priority = 50

    def __init__(self):
        self.extra: dict = {}

    def on_train_start(self, trainer) -> None:
        self.peak = device_peak_flops(trainer.device)
        self.tokens_at, self.seconds_at = trainer.state.tokens, trainer.step_seconds
        if getattr(self, "pairs", None) is None:  # attention work of the real batches (moetrain/flops.py)
            self.pairs = PairCounter()
            self.pairs.attach(trainer.model)

    def pre_step(self, trainer) -> None:
        self.pairs.set_stage(trainer.cfg.model, trainer.plan.attention, trainer.plan.seq_len)

    def post_step(self, trainer) -> None:
        if trainer.is_log_step():
            rec = self._record(trainer)
            if trainer.rank == 0:
                trainer.dispatch("log_metrics", rec)

    def _record(self, trainer) -> dict:
        m, s, plan, world = trainer.step_metrics, trainer.state, trainer.plan, trainer.world
        t0 = time.perf_counter()
        vec = torch.stack([m.loss, m.lm_loss, m.aux_loss, trainer.take_pending_tokens().to(torch.float64),
                           self.pairs.take(m.loss.device)])
        loss, lm_loss, aux_loss, tokens, pairs = all_reduce_sum(vec).cpu().tolist()  # the one host sync
        if world > 1:
            loss, lm_loss, aux_loss = loss / world, lm_loss / world, aux_loss / world
        s.tokens += int(tokens)
        # Step time over the interval: host time in the steps plus the wait above for the
        # device to finish them (asynchronous on GPU), without checkpoints or evaluations.
        seconds = trainer.step_seconds - self.seconds_at + time.perf_counter() - t0
        tps = (s.tokens - self.tokens_at) / max(seconds, 1e-9)
        # MFU: 6 x active params per token + the attention pairs the pattern really computed.
        flops = dense_flops_per_token(trainer.cfg.model, trainer.param_counts) * (s.tokens - self.tokens_at) \
            + attention_flops(trainer.cfg.model, pairs)
        self.tokens_at, self.seconds_at = s.tokens, trainer.step_seconds
        rec = {"step": s.step, "stage": plan.name, "loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss,
               "lr": trainer.lr, "tokens": s.tokens, "tokens_per_s": tps, "grad_norm": _grad_norm(trainer),
               "seq_len": plan.seq_len,
               "mfu": flops / max(seconds, 1e-9) / (self.peak * world),
               "elapsed_s": time.time() - trainer.start_time}
        rec.update(self.extra)
        self.extra = {}
        return rec


def _grad_norm(trainer):
    """This step's pre-clip norm: DeepSpeed's when its optimizer keeps one, else ours
    (None only if neither exists, never a made-up 0)."""
    norm = trainer.engine.get_global_grad_norm()
    if norm is None:
        norm = trainer.step_metrics.grad_norm
    return None if norm is None else float(norm)
