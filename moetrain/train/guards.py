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

from moetrain.checkpoint import RunDir, truncate_metrics
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


class SpikeGuard(Callback):
    """A loss spike: this step's loss over all ranks (NonFiniteGuard.global_loss: no extra
    host sync) above guards.spike_threshold times the mean of the last guards.spike_window
    finite losses, once guards.spike_warmup of them exist (llm-foundry's loss-spike callback;
    Megatron's rerun machinery for the rollback). guards.spike_action says what it does:

      log       one console line and a `loss_spike` event; the step trains as usual
      skip      the update is dropped on every rank (the weights and optimizer state stay
                as they were); the spike's loss stays out of the window
      rollback  the update is dropped, the newest complete checkpoint of this run's history
                is reloaded (weights, optimizer, RNG, loader, every callback's state) and the
                loader skips exactly the batches trained on since it, through the spike, so
                they are never trained on; metrics.jsonl is cut back to that step. A skip
                where that checkpoint lies in an earlier stage or none exists yet.

    Every spike counts (`spikes` in each log record, kept over checkpoints and rollbacks);
    skip / rollback stop the run (exit 1) at guards.max_spikes of them. The dropped batch
    ranges are kept in the checkpoint (`spike_guard.dropped`); later checkpoints hold a
    loader position past them, so resuming from those skips them as well."""

    priority = 90  # after NonFiniteGuard (100) reduced the loss; before metrics (50) and saves (0)

    def __init__(self):
        self.window: list[float] = []   # recent finite losses (checkpointed)
        self.spikes = 0                 # spikes seen in the run (checkpointed, not rolled back)
        self.dropped: list[dict] = []   # rollbacks: what was dropped (checkpointed, not rolled back)
        self._spike: Optional[tuple] = None   # (loss, window mean) of this step's spike
        self._anchor: Optional[tuple] = None  # (path, step, stage) of this history's newest checkpoint
        self._skipped = 0               # steps' batches skipped since the anchor's loader position
        self._pending: Optional[tuple] = None  # (steps already skipped, steps to drop now): on_stage_start

    # ------------------------------------------------------------------ detection
    def on_train_start(self, trainer) -> None:
        if trainer.resumed_from:
            self._anchor = (trainer.resumed_from, trainer.state.step, trainer.state.stage)

    def on_checkpoint(self, trainer, path: str) -> None:
        self._anchor, self._skipped = (path, trainer.state.step, trainer.state.stage), 0

    @staticmethod
    def _global_loss(trainer) -> Optional[float]:
        nf = trainer.callback(NonFiniteGuard)
        return nf.global_loss if nf is not None else flag_and_global_loss(trainer)[1]

    def post_backward(self, trainer) -> None:
        g, self._spike = trainer.cfg.guards, None
        if g.spike_action == "off":
            return
        loss = self._global_loss(trainer)
        if loss is None:  # NaN/Inf: NonFiniteGuard's case
            return
        if len(self.window) >= g.spike_warmup:
            mean = sum(self.window) / len(self.window)
            if loss > g.spike_threshold * mean:
                self._spike = (loss, mean)
                if g.spike_action != "log":
                    trainer.skip_update = True  # rollback too: a reload follows, nothing to update
                    return
        self.window.append(loss)
        del self.window[:-g.spike_window]

    def post_step(self, trainer) -> None:
        g = trainer.cfg.guards
        if self._spike is not None:
            self._act(trainer, g)
        if g.spike_action != "off" and trainer.is_log_step():
            trainer.record_metrics({"spikes": self.spikes})

    # ------------------------------------------------------------------ actions
    def _act(self, trainer, g) -> None:
        (loss, mean), step = self._spike, trainer.state.step
        self.spikes += 1
        action = g.spike_action
        target = self._rollback_target(trainer) if action == "rollback" else None
        if action == "rollback" and target is None:
            action, done = "skip", "no checkpoint of this stage to roll back to: update skipped on all ranks"
        elif action == "rollback":
            done = (f"rolling back to the checkpoint of step {target[1]} and dropping the batches of steps "
                    f"{target[1] + 1}-{step}")
        else:
            done = "logged only" if action == "log" else "update skipped on all ranks"
        if trainer.rank == 0:
            print(f"step {step}: loss spike {loss:.4f} = {loss / mean:.2f}x the mean {mean:.4f} of the last "
                  f"{len(self.window)} steps; {done} ({self.spikes} in this run)", file=sys.stderr, flush=True)
        event = {"step": step, "stage": trainer.plan.name, "event": "loss_spike", "spike_step": step,
                 "loss": loss, "window_mean": mean, "action": action, "spikes": self.spikes}
        if target is None:
            trainer.log_event(event)
        else:
            entry = {"stage": trainer.plan.name, "checkpoint_step": target[1], "spike_step": step,
                     "steps": [target[1] + 1, step]}
            carry = (self.spikes, self.dropped + [entry], self._skipped, step - target[1])
            trainer.request_reload(target[0], then=lambda t: self._after_reload(t, event, *carry))
        if action != "log" and self.spikes >= g.max_spikes and not trainer.stop_reason:
            trainer.request_stop(f"stopped: {self.spikes} loss spikes above {g.spike_threshold}x the recent mean "
                                 f"(guards.max_spikes={g.max_spikes}); the run is diverging, not hitting one bad "
                                 "batch: lower optim.lr or check the data, then resume", ok=False)

    def _rollback_target(self, trainer) -> Optional[tuple]:
        """(path, step, stage) of the newest complete checkpoint of this run's history (the
        last one this process wrote, or the one it resumed from): the same on every rank."""
        a = self._anchor
        if a is None or a[2] != trainer.state.stage or a[1] >= trainer.state.step:
            return None
        return a

    def _after_reload(self, trainer, event: dict, spikes: int, dropped: list, skipped: int, steps: int) -> None:
        """Runs once the checkpoint is restored (this callback's state included): keep what the
        rollback must not undo, and have on_stage_start move the new loader past the batches."""
        self.spikes, self.dropped = spikes, dropped
        self._pending, self._skipped = (skipped, steps), skipped + steps
        if trainer.rank == 0:
            truncate_metrics(RunDir(trainer.run_dir).metrics, trainer.state.step)
        # written after the cut, at the step training continues from, so that it stays in the file
        trainer.log_event({**event, "step": trainer.state.step, "rollback_to": trainer.state.step})

    def on_stage_start(self, trainer, plan) -> None:
        if self._pending is None:
            return
        (done, steps), self._pending = self._pending, None
        slot = lambda: trainer.loader.state_dict().get("slot")  # noqa: E731 - TokenLoader's global position
        for _ in range(done * plan.grad_accum_steps):  # dropped by an earlier rollback to this checkpoint
            trainer.loader.next_batch()
        first = slot()
        for _ in range(steps * plan.grad_accum_steps):
            trainer.loader.next_batch()
        if first is not None:
            self.dropped[-1]["slots"] = [first, slot()]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"spike_guard": {"window": list(self.window), "spikes": self.spikes, "dropped": list(self.dropped)}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("spike_guard", {})
        self.window = list(saved.get("window", []))
        self.spikes, self.dropped = saved.get("spikes", 0), list(saved.get("dropped", []))
