"""Stage-end long-context evaluation as a Trainer callback (plugged in by
moetrain/compose.py): passkey grid and loss by position through the training
engine on every rank (ZeRO-3 gathers collectively); rank 0 writes
RUN_DIR/eval/<stage>/ and sends the plots to W&B."""
from __future__ import annotations

import torch

from moetrain.checkpoint import RunDir
from moetrain.train.callback import Callback
from moetrain.train.sinks import WandbSink


class LongContextEvalCallback(Callback):
    priority = 30  # after the held-out loss (40): its fields follow eval_loss in the record

    def on_stage_end(self, trainer, plan, record: dict) -> None:
        if not trainer.cfg.eval.enabled:
            return
        from moetrain.eval.long_context import evaluate_stage
        engine, device = trainer.engine, trainer.device

        def forward(input_ids, position_ids=None):
            with torch.no_grad():
                return engine(input_ids.to(device), position_ids=position_ids).logits.float().cpu()

        sink = trainer.callback(WandbSink)
        engine.eval()
        record.update(evaluate_stage(forward, trainer.cfg, plan, RunDir(trainer.run_dir).eval_dir(plan.name),
                                     write=trainer.rank == 0, wandb_run=sink.run if sink else None))
        engine.train()
