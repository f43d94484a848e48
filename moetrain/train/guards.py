"""Fault-tolerance guards of the fit loop (issue 16).

PreemptionCallback: SIGTERM / SIGINT (a scheduler's preemption notice, Ctrl-C) end
training cleanly after the current optimizer step: the final checkpoint is written by
CheckpointCallback.on_train_end and the process exits 0, so relaunching the same command
continues exactly where it stopped.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

from moetrain.train.callback import Callback


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

