"""The Trainer's seams: a callback plugged in from outside, callback state in the
checkpoint, and host syncs on a non-logging step."""
import collections
import os
import sys

import pytest
import torch
from train_helpers import ROOT, tiny_overrides

from moetrain import checkpoint
from moetrain.compose import train
from moetrain.config import load_config
from moetrain.train.callback import Callback

DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
MOETRAIN = os.path.join(ROOT, "moetrain")
TRAIN_PKG = os.path.join(MOETRAIN, "train")


class StopAt(Callback):
    """Records the steps and stage starts it sees; ends training at step `n`; keeps a
    counter in the checkpoint."""

    def __init__(self, n):
        self.n, self.steps, self.stages, self.ends, self.seen_total = n, [], [], 0, 0

    def on_stage_start(self, trainer, plan):
        self.stages.append(plan.name)

    def post_step(self, trainer):
        self.steps.append(trainer.state.step)
        self.seen_total += 1
        if trainer.state.step == self.n:
            trainer.request_stop(f"StopAt({self.n})")

    def on_train_end(self, trainer):
        self.ends += 1

    def state_dict(self):
        return {"stop_at_seen": self.seen_total}

    def load_state_dict(self, state):
        self.seen_total = state.get("stop_at_seen", 0)


def test_outside_callback_sees_steps_stops_and_resumes(tiny_data, tmp_path):
    run = str(tmp_path / "run")
    ov = tiny_overrides(tiny_data, steps=10, **{"checkpoint.every_steps": 100})
    cb = StopAt(6)
    state = train(load_config(DEFAULT, ov), run, resume="never", callbacks=[cb])
    assert cb.steps == [1, 2, 3, 4, 5, 6] and cb.stages == ["main"] and cb.ends == 1
    assert state.step == 6 and state.stage == 0
    # The stop wrote a complete checkpoint (as at the step cap) carrying the callback's state.
    client = checkpoint.read_client_state(checkpoint.newest_complete(os.path.join(run, "checkpoints")))
    assert client["step"] == 6 and client["stop_at_seen"] == 6
    # The next launch continues from it and restores the callback's state first.
    cb2 = StopAt(-1)
    state = train(load_config(DEFAULT, ov), run, resume="auto", callbacks=[cb2])
    assert cb2.steps == [7, 8, 9, 10] and cb2.seen_total == 10 and state.step == 10
    ref = str(tmp_path / "ref")
    train(load_config(DEFAULT, ov), ref, resume="never")
    from test_train import step_losses
    assert step_losses(run) == step_losses(ref)  # stop + resume is exact, bit for bit


SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")


class SyncCounter:
    """Counts calls of the Tensor methods that copy to the host, by calling file."""

    def __init__(self, monkeypatch):
        self.by_file = collections.Counter()
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))

    def _wrap(self, orig):
        def counted(t, *a, **k):
            self.by_file[sys._getframe(1).f_code.co_filename] += 1
            return orig(t, *a, **k)
        return counted

    def snapshot(self):
        return collections.Counter(self.by_file)


class StepSyncs(Callback):
    """Sync counts of every step, from before pre_step (priority high) to after the
    last post_step callback (a second instance with priority low)."""

    def __init__(self, counter, box, priority):
        self.counter, self.box, self.priority = counter, box, priority

    def pre_step(self, trainer):
        if self.priority > 0:
            self.box["start"] = self.counter.snapshot()

    def post_step(self, trainer):
        if self.priority < 0:
            diff = self.counter.snapshot()
            diff.subtract(self.box["start"])
            self.box[trainer.state.step] = +diff

    def on_train_end(self, trainer):
        """Reference: the same engine stepped by hand, with no trainer around it."""
        if self.priority < 0:
            return
        loader = trainer.make_loader(trainer.plan)
        batches = [loader.next_batch() for _ in range(trainer.plan.grad_accum_steps)]
        before = self.counter.snapshot()
        for batch in batches:
            out = trainer.engine(**batch)
            trainer.engine.backward(out.loss)
            trainer.engine.step()
        diff = self.counter.snapshot()
        diff.subtract(before)
        self.box["bare"] = +diff


@pytest.mark.parametrize("zero", [0, 1])
def test_no_host_sync_on_a_non_logging_step(tiny_data, tmp_path, monkeypatch, zero):
    ov = tiny_overrides(tiny_data, steps=7, **{"logging.every_steps": 5, "deepspeed.zero_stage": zero,
                                              "checkpoint.every_steps": 100})
    counter, box = SyncCounter(monkeypatch), {}
    train(load_config(DEFAULT, ov), str(tmp_path / "run"), resume="never",
          callbacks=[StepSyncs(counter, box, 10_000), StepSyncs(counter, box, -10_000)])
    ours = lambda c: sum(n for f, n in c.items() if f.startswith(TRAIN_PKG))  # noqa: E731
    guard = os.path.join(TRAIN_PKG, "guards.py")
    for step in (2, 3, 4, 6):  # not logged
        # The one host copy per step is the NaN/Inf guard's 4-byte flag: whether to skip
        # the update has to be decided on the host, before the optimizer steps.
        assert {f: n for f, n in box[step].items() if f.startswith(TRAIN_PKG)} == {guard: 1}, (step, box[step])
        # Whatever else syncs is the model and the engine themselves: the same number as
        # a bare forward/backward/step (model-internal CPU shape checks, DeepSpeed, torch).
        assert sum(box[step].values()) == sum(box["bare"].values()) + 1, (step, box[step], box["bare"])
    # A logging step syncs in the trainer, once for the losses (plus the host-side unpacking).
    assert ours(box[5]) > 0 and ours(box[1]) > 0
