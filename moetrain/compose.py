"""The composition root: the Trainer with the stock callbacks, as scripts/train.py
runs it. The only place that joins training with evaluation and export (moetrain/
train/ imports neither).

    from moetrain.compose import train
    state = train(cfg, "runs/demo", callbacks=[MyCallback()])
"""
from __future__ import annotations

from typing import Optional

from moetrain.config import TrainConfig
from moetrain.eval.callback import LongContextEvalCallback
from moetrain.eval.summary import RunSummaryCallback
from moetrain.export.callback import ExportCallback, WarmStartCallback
from moetrain.train.callback import Callback
from moetrain.train.callbacks import CheckpointCallback, HeldOutEvalCallback, MoERouterCallback
from moetrain.train.guards import NonFiniteGuard, PreemptionCallback, SpikeGuard
from moetrain.train.sinks import ConsoleSink, JsonlSink, WandbSink
from moetrain.train.trainer import Trainer, TrainState


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    """Order matters only among equal priorities (the sinks: file, W&B, console)."""
    return [WarmStartCallback(), MoERouterCallback(), HeldOutEvalCallback(), LongContextEvalCallback(),
            CheckpointCallback(), ExportCallback(), RunSummaryCallback(), JsonlSink(), WandbSink(), ConsoleSink(cfg.logging.console),
            PreemptionCallback(), NonFiniteGuard(), SpikeGuard()]


def train(cfg: TrainConfig, run_dir: str, resume: str = "auto", overwrite: bool = False,
          local_rank: Optional[int] = None, callbacks: list[Callback] = ()) -> TrainState:
    """Run every stage of `cfg` in `run_dir`, resumable at any checkpoint; `callbacks`
    are added to the stock ones."""
    trainer = Trainer(cfg, run_dir, default_callbacks(cfg) + list(callbacks), resume=resume, overwrite=overwrite,
                      local_rank=local_rank)
    return trainer.fit()
