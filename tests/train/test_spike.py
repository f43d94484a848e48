"""SpikeGuard: a loss spike is logged, or its update skipped, or the run rolls back to the
newest complete checkpoint and never trains on the batches up to the spike; max_spikes
stops the run; the guard's state survives checkpoint and resume exactly."""
import json
import os

import pytest
import torch
from train_helpers import ROOT, tiny_overrides

from moetrain import checkpoint as ckpt
from moetrain.compose import train
from moetrain.config import load_config
from moetrain.train.callback import Callback

DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
GUARD = {"guards.spike_window": 5, "guards.spike_warmup": 3}


class Spike(Callback):
    """Before the guards see the step (priority 150): the loss they read is multiplied by
    `factor` the first time each of `steps` (1-based) is reached (the gradients are the
    batch's own). Records, per visit of a step, the loader's slot before it, the weights
    (parameters and buffers) before and after it, and whether the update was skipped."""

    priority = 150

    def __init__(self, steps, factor=10.0):
        self.todo, self.factor = list(steps), factor  # fired in this order (a rerun may revisit a step)
        self.visits = []   # (step, loader slot before it), in the order trained
        self.before, self.after, self.skipped = {}, {}, {}  # step -> the last visit's value

    @staticmethod
    def _weights(trainer):
        return [t.detach().clone() for t in (*trainer.model.parameters(), *trainer.model.buffers())]

    def pre_step(self, trainer):
        step = trainer.state.step + 1
        self.visits.append((step, trainer.loader.state_dict()["slot"]))
        self.before[step] = self._weights(trainer)

    def post_backward(self, trainer):
        step = trainer.state.step + 1
        if self.todo and step == self.todo[0]:
            self.todo.pop(0)
            trainer.step_loss = trainer.step_loss * self.factor

    def post_step(self, trainer):
        self.after[trainer.state.step] = self._weights(trainer)
        self.skipped[trainer.state.step] = trainer.skip_update


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if "event" not in r], [r for r in recs if r.get("event") == "loss_spike"]


def _run(tiny_data, run, steps, action, spike_steps=(), resume="never", **extra):
    ov = tiny_overrides(tiny_data, steps=steps, **{**GUARD, "guards.spike_action": action, **extra})
    cb = Spike(spike_steps)
    return train(load_config(DEFAULT, ov), run, resume=resume, callbacks=[cb]), cb


def test_spike_log_counts_and_trains_on(tiny_data, tmp_path, capsys):
    state, cb = _run(tiny_data, str(tmp_path / "log"), 8, "log", [6])
    assert state.step == 8 and state.stop_reason is None
    assert not cb.skipped[6] and not _same(cb.before[6], cb.after[6])  # logged only: the step trained
    recs, events = _metrics(str(tmp_path / "log"))
    assert [r["spikes"] for r in recs] == [0] * 5 + [1] * 3
    assert [(e["spike_step"], e["action"], e["spikes"]) for e in events] == [(6, "log", 1)]
    assert events[0]["loss"] > 2 * events[0]["window_mean"]
    assert events[0]["loss"] == pytest.approx(10 * recs[5]["loss"], rel=1e-9)  # the guard's global loss
    err = capsys.readouterr().err
    assert "step 6: loss spike" in err and "logged only (1 in this run)" in err
    saved = ckpt.read_client_state(ckpt.RunDir(str(tmp_path / "log")).newest_complete())["spike_guard"]
    assert saved["spikes"] == 1 and events[0]["loss"] in saved["window"]  # a logged spike joins the window


@pytest.mark.parametrize("action", ["skip", "rollback"])  # rollback without a checkpoint to go to: a skip
def test_spike_skip_leaves_weights_and_buffers_unchanged(tiny_data, tmp_path, capsys, action):
    run = str(tmp_path / action)
    # expert bias on: the skipped step must not move that buffer either
    state, cb = _run(tiny_data, run, 8, action, [6], **{"checkpoint.every_steps": 100,
                                                        "model.moe.bias_update_speed": 0.01})
    assert state.step == 8 and state.stop_reason is None
    assert cb.skipped[6] and _same(cb.before[6], cb.after[6])   # every weight and buffer as before
    assert not _same(cb.before[7], cb.after[7])                 # the next step trains again
    assert [s for s, _ in cb.visits] == list(range(1, 9))       # no rollback happened
    recs, events = _metrics(run)
    assert [r["spikes"] for r in recs] == [0] * 5 + [1] * 3
    assert [r["nonfinite"] for r in recs] == [0] * 8            # a spike is not a NaN step
    assert [(e["spike_step"], e["action"]) for e in events] == [(6, "skip")]
    saved = ckpt.read_client_state(ckpt.RunDir(run).newest_complete())["spike_guard"]
    assert events[0]["loss"] not in saved["window"] and len(saved["window"]) == 5  # kept out of the baseline
    err = capsys.readouterr().err
    expect = "update skipped on all ranks" if action == "skip" else "no checkpoint of this stage to roll back to"
    assert f"{expect}" in err


def test_spike_state_survives_checkpoint_and_resume_exactly(tiny_data, tmp_path):
    full, _ = _run(tiny_data, str(tmp_path / "full"), 10, "skip", [6])
    cut = str(tmp_path / "cut")
    _run(tiny_data, cut, 10, "skip", [6], **{"train.max_steps": 7})  # stops at 7, final checkpoint there
    _run(tiny_data, cut, 10, "skip", (), resume="auto")
    a, b = (ckpt.read_client_state(ckpt.RunDir(r).newest_complete()) for r in (str(tmp_path / "full"), cut))
    assert a["step"] == b["step"] == 10
    assert a["spike_guard"] == b["spike_guard"] and a["spike_guard"]["spikes"] == 1  # floats equal exactly
    assert [r["loss"] for r in _metrics(cut)[0]] == [r["loss"] for r in _metrics(str(tmp_path / "full"))[0]]


class SkipBatches(Callback):
    """The reference for a rollback: a run that never sees the batches of `steps` steps,
    skipped right before step `after` + 1."""

    def __init__(self, after, steps):
        self.after, self.steps = after, steps

    def pre_step(self, trainer):
        if trainer.state.step == self.after:
            for _ in range(self.steps * trainer.plan.grad_accum_steps):
                trainer.loader.next_batch()


@pytest.mark.slow
def test_spike_rollback_restores_the_checkpoint_and_never_trains_on_the_dropped_batches(tiny_data, tmp_path,
                                                                                        capsys):
    run, ref, cut = (str(tmp_path / n) for n in ("rollback", "ref", "cut"))
    extra = {"checkpoint.every_steps": 5, "train.grad_accum_steps": 2, "train.micro_batch_size": 2}
    state, cb = _run(tiny_data, run, 12, "rollback", [8], **extra)
    assert state.step == 12 and state.stop_reason is None
    # Steps 6-8 ran, the spike at 8 reloaded the checkpoint of step 5, and steps 6-12 ran again.
    visits = cb.visits
    assert [s for s, _ in visits] == list(range(1, 9)) + list(range(6, 13))
    first, second = dict(visits[:8]), dict(visits[8:])
    # The reference: a run that never sees the batches of steps 6-8 (skipped before step 6).
    ov = tiny_overrides(tiny_data, steps=12, **{**GUARD, "guards.spike_action": "rollback", **extra})
    ref_cb = Spike(())
    train(load_config(DEFAULT, ov), ref, resume="never", callbacks=[SkipBatches(5, 3), ref_cb])
    # The weights the rerun starts from are the checkpoint's, bit for bit (= after step 5).
    assert _same(cb.before[6], ref_cb.after[5]) and not _same(cb.before[6], ref_cb.after[6])
    # The loader skipped exactly the batches of steps 6-8: step 6 now reads what step 9 would have.
    per_step = first[7] - first[6]
    assert per_step > 0 and second[6] == first[8] + per_step
    dropped = set(range(first[6], first[8] + per_step))
    trained = {s for step, slot in visits[:5] + visits[8:] for s in range(slot, slot + per_step)}
    assert not dropped & trained
    # ... and the rerun equals that run, loss for loss, bit for bit.
    recs, events = _metrics(run)
    want = {r["step"]: r["loss"] for r in _metrics(ref)[0]}
    assert [r["step"] for r in recs] == list(range(1, 13))   # the undone steps were cut from the file
    assert [r["loss"] for r in recs] == [want[s] for s in range(1, 13)]
    assert [r["spikes"] for r in recs] == [0] * 5 + [1] * 7
    assert [(e["step"], e["spike_step"], e["action"], e["rollback_to"]) for e in events] == [(5, 8, "rollback", 5)]
    assert "step 8: loss spike" in capsys.readouterr().err
    saved = ckpt.read_client_state(ckpt.RunDir(run).newest_complete())["spike_guard"]
    assert saved["dropped"] == [{"stage": "main", "checkpoint_step": 5, "spike_step": 8, "steps": [6, 8],
                                 "slots": [first[6], first[8] + per_step]}]
    # A later resume of the rolled-back run continues exactly (its checkpoints are past the batches).
    _run(tiny_data, cut, 12, "rollback", [8], **{**extra, "train.max_steps": 10})
    assert ckpt.read_client_state(ckpt.RunDir(cut).newest_complete())["step"] == 10
    _run(tiny_data, cut, 12, "rollback", (), resume="auto", **extra)
    assert [r["loss"] for r in _metrics(cut)[0]] == [r["loss"] for r in recs]
    assert ckpt.read_client_state(ckpt.RunDir(cut).newest_complete())["spike_guard"] == saved


def test_max_spikes_stops_the_run_as_a_failure(tiny_data, tmp_path):
    state, cb = _run(tiny_data, str(tmp_path / "max"), 12, "skip", [5, 7], **{"guards.max_spikes": 2})
    assert state.step == 7 and not state.stop_ok
    assert state.stop_reason.startswith("stopped: 2 loss spikes above 2.0x the recent mean (guards.max_spikes=2)")
    assert cb.skipped[5] and cb.skipped[7] and not cb.skipped[6]


@pytest.mark.slow
def test_a_second_spike_before_the_next_checkpoint_drops_both_ranges(tiny_data, tmp_path):
    """Spike at step 8 (rollback to 5, batches of 3 steps dropped), then again at the rerun's
    step 7: back to 5 once more, now past all 5 steps' batches trained on since it."""
    run = str(tmp_path / "twice")
    state, cb = _run(tiny_data, run, 10, "rollback", [8, 7], **{"checkpoint.every_steps": 5})
    assert state.step == 10
    visits = cb.visits
    assert [s for s, _ in visits] == list(range(1, 9)) + [6, 7] + list(range(6, 11))
    first, second, third = dict(visits[:8]), dict(visits[8:10]), dict(visits[10:])
    per_step = first[7] - first[6]
    assert second[6] == first[6] + 3 * per_step and third[6] == first[6] + 5 * per_step
    assert _same(cb.before[6], cb.after[5])  # the checkpoint's weights, again
    saved = ckpt.read_client_state(ckpt.RunDir(run).newest_complete())["spike_guard"]
    assert saved["spikes"] == 2
    assert [(d["spike_step"], d["steps"], d["slots"]) for d in saved["dropped"]] == [
        (8, [6, 8], [first[6], first[6] + 3 * per_step]),
        (7, [6, 7], [first[6] + 3 * per_step, first[6] + 5 * per_step])]
    recs, events = _metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 11)) and [e["spike_step"] for e in events] == [8, 7]
