"""Numerical guards: a NaN/Inf step skips its update without touching the weights, and
guards.max_nonfinite_steps such steps in a row stop the run as a failure."""
import json
import os

import torch
from train_helpers import ROOT, tiny_overrides

from moetrain.compose import train
from moetrain.config import load_config
from moetrain.train.callback import Callback

DEFAULT = os.path.join(ROOT, "configs", "default.yaml")


class Poison(Callback):
    """Before the guard (priority 100) sees the step: a NaN loss, or a NaN in one gradient,
    at the given (1-based) steps; snapshots the weights around every step."""

    priority = 150

    def __init__(self, steps, where="loss"):
        self.steps, self.where, self.before, self.after = set(steps), where, {}, {}

    def _weights(self, trainer):
        return [p.detach().clone() for p in trainer.model.parameters()]

    def pre_step(self, trainer):
        self.before[trainer.state.step + 1] = self._weights(trainer)

    def post_backward(self, trainer):
        if trainer.state.step + 1 not in self.steps:
            return
        if self.where == "loss":
            trainer.step_loss = trainer.step_loss * float("nan")
        else:
            # ZeRO-1/2 (the default config) keep the reduced gradients in DeepSpeed's partitions
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            grads += [g for group in getattr(trainer.engine.optimizer, "averaged_gradients", {}).values()
                      for g in (group or []) if g is not None]
            grads[0].view(-1)[0] = float("inf")

    def post_step(self, trainer):
        self.after[trainer.state.step] = self._weights(trainer)


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "event" not in r]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_nonfinite_loss_and_gradient_skip_the_update_and_are_counted(tiny_data, tmp_path, capsys):
    for where in ("loss", "grad"):
        run = str(tmp_path / where)
        cb = Poison({3}, where)
        # ZeRO-0 for the gradient case: under ZeRO-1 the module's gradients are already reduced away
        ov = tiny_overrides(tiny_data, steps=5, **({"deepspeed.zero_stage": 0} if where == "grad" else {}))
        state = train(load_config(DEFAULT, ov), run, resume="never", callbacks=[cb])
        assert state.step == 5 and state.stop_reason is None
        assert _same(cb.before[3], cb.after[3])           # the skipped step left every weight as it was
        assert not _same(cb.before[4], cb.after[4])       # the next step trains again
        assert all(torch.isfinite(w).all() for w in cb.after[5])
        recs = {r["step"]: r for r in _records(run)}
        assert [recs[s]["nonfinite"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
        assert [recs[s]["update_skipped"] for s in range(1, 6)] == [False, False, True, False, False]
        assert "step 3: NaN/Inf in the loss or gradients; update skipped on all ranks (1 in a row" \
            in capsys.readouterr().err


def test_max_nonfinite_steps_in_a_row_stop_the_run_as_a_failure(tiny_data, tmp_path, capsys):
    run = str(tmp_path / "stop")
    ov = tiny_overrides(tiny_data, steps=8, **{"guards.max_nonfinite_steps": 2})
    cb = Poison({2, 4, 5, 6})
    state = train(load_config(DEFAULT, ov), run, resume="never", callbacks=[cb])
    assert state.step == 5 and not state.stop_ok          # 2 alone did not stop it; 4 and 5 did
    assert state.stop_reason.startswith("stopped: 2 optimizer steps in a row had NaN/Inf loss or gradients "
                                        "(guards.max_nonfinite_steps=2)")
    assert _same(cb.before[4], cb.after[5])
