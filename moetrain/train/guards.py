"""Fault-tolerance guards of the fit loop (issue 16).

PreemptionCallback: SIGTERM / SIGINT (a scheduler's preemption notice, Ctrl-C) end
training cleanly after the current optimizer step: the final checkpoint is written by
CheckpointCallback.on_train_end and the process exits 0, so relaunching the same command
continues exactly where it stopped.

NonFiniteGuard: a NaN / Inf in the loss or the gradients skips that optimizer update on
every rank together; guards.max_nonfinite_steps such steps in a row stop training (exit 1).

SpikeGuard: a loss far above the recent mean is logged, or its update skipped, or the run
rolls back to the newest complete checkpoint and drops the batches up to the spike.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

import torch
import torch.distributed as dist

from moetrain.train.callback import Callback
from moetrain.train.step import any_nonfinite


class PreemptionCallback(Callback):
    """Signal handlers only set a flag (they run between two bytecodes, anywhere in
    training); the flag is acted on after an optimizer step. Under several ranks the
    flag is agreed by one all-reduce (max) per step of a CPU tensor over gloo, so no
    device sync is added; a signal may reach only some ranks.

    Priority -200, the lowest: post_step runs after CheckpointCallback's (a stop right
    after a periodic save does not save twice), and on_train_end restores the previous
    handlers after the final save, so a second signal during that save is ignored."""

    priority = -200
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int = 0          # the first signal's number, 0 = none
        self._previous: dict = {}
        self._group = None              # gloo group for the flag (None: the default group is gloo)

    def on_train_start(self, trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread install handlers; nothing to agree on then
        if trainer.world > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # collective: every rank gets here
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:
            print(f"received {name} again: ignored until the checkpoint is written", file=sys.stderr, flush=True)
            return
        self.received = signum
        print(f"received {name}: stopping after this step and saving a checkpoint", file=sys.stderr, flush=True)

    def agreed_signal(self, trainer) -> int:
        if trainer.world == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int32)  # CPU: no device sync
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag[0])

    def post_step(self, trainer) -> None:
        if not self._previous or trainer.stop_reason:
            return
        sig = self.agreed_signal(trainer)
        if sig:
            self.received = self.received or sig  # a rank that got no signal ignores later ones too
            trainer.request_stop(f"preempted by {signal.Signals(sig).name} at step {trainer.state.step}")

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer) -> None:
        self._restore()

    def on_error(self, trainer, exc: BaseException) -> None:
        self._restore()



def flag_and_global_loss(trainer) -> tuple[bool, Optional[float]]:
    """(NaN/Inf on any rank, the step's loss averaged over ranks or None when NaN/Inf), from
    one all-reduce (sum) of [this rank's flag, its loss] and one host copy: what deciding to
    skip an update costs, shared by both guards. The reduced value is the same on every rank."""
    flag = any_nonfinite(trainer.step_loss, trainer.engine)
    vec = torch.stack([flag.double(), trainer.step_loss.detach().double().reshape(())])
    if trainer.world > 1:
        dist.all_reduce(vec)
    bad, loss_sum = vec.tolist()  # the one host copy per step
    return bad > 0, (None if bad > 0 else loss_sum / trainer.world)


class NonFiniteGuard(Callback):
    """post_backward: this rank's flag (loss or any gradient it holds is NaN/Inf) is agreed
    by one all-reduce, so all ranks skip the same update (trainer.skip_update; the weights
    are never touched: moetrain.train.step.skip_update). The flag is a device tensor; the
    one host copy per step (flag_and_global_loss) is what deciding to skip costs, and it
    also carries the loss over all ranks that SpikeGuard reads (global_loss).

    Counts go into the log record (`nonfinite`: skipped steps since the start of the run,
    kept in the checkpoint) with one console line per skipped step; after
    guards.max_nonfinite_steps skipped steps in a row, request_stop(ok=False)."""

    priority = 100

    def __init__(self):
        self.skipped = 0   # over the run (checkpointed)
        self.streak = 0    # skipped steps in a row (checkpointed)
        self._skipped_now = False
        self.global_loss: Optional[float] = None  # this step's loss over all ranks (None: NaN/Inf)

    def post_backward(self, trainer) -> None:
        self._skipped_now, self.global_loss = flag_and_global_loss(trainer)
        if self._skipped_now:
            trainer.skip_update = True

    def post_step(self, trainer) -> None:
        step = trainer.state.step
        # DeepSpeed may also have dropped the update on its own (its rank-agreed overflow
        # check, where its optimizer runs one): count that as a skipped step too.
        # A skip another guard asked for (SpikeGuard) goes through that same overflow path: not ours.
        ds_overflow = not trainer.skip_update and bool(getattr(trainer.engine.optimizer, "overflow", False))
        self._skipped_now = self._skipped_now or ds_overflow
        if self._skipped_now:
            self.skipped, self.streak = self.skipped + 1, self.streak + 1
            limit = trainer.cfg.guards.max_nonfinite_steps
            if trainer.rank == 0:
                print(f"step {step}: NaN/Inf in the loss or gradients; update skipped on all ranks "
                      f"({self.streak} in a row, {self.skipped} in this run)", file=sys.stderr, flush=True)
            if self.streak >= limit and not trainer.stop_reason:
                trainer.request_stop(f"stopped: {self.streak} optimizer steps in a row had NaN/Inf loss or "
                                     f"gradients (guards.max_nonfinite_steps={limit}); lower optim.lr, check the "
                                     "data, or resume from an earlier checkpoint", ok=False)
        else:
            self.streak = 0
        if trainer.is_log_step():
            trainer.record_metrics({"nonfinite": self.skipped, "update_skipped": self._skipped_now})

    def state_dict(self) -> dict:
        return {"nonfinite_guard": {"skipped": self.skipped, "streak": self.streak}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("nonfinite_guard", {})
        self.skipped, self.streak = saved.get("skipped", 0), saved.get("streak", 0)
