"""Stage-end long-context evaluation as a Trainer callback (plugged in by
moetrain/compose.py): passkey grid and loss by position through the training
engine on every rank (ZeRO-3 gathers collectively), each doing its share of the
passkey grid and loss windows (sequence-parallel groups together); rank 0 writes
RUN_DIR/eval/<stage>/ and sends the plots to W&B."""
from __future__ import annotations

from moetrain.checkpoint import RunDir
from moetrain.train.callback import Callback
from moetrain.train.sinks import WandbSink


class LongContextEvalCallback(Callback):
    priority = 30  # after the held-out loss (40): its fields follow eval_loss in the record

    def on_stage_end(self, trainer, plan, record: dict) -> None:
        if not trainer.cfg.eval.enabled:
            return
        from moetrain.eval.loading import ModelForward
        from moetrain.eval.long_context import evaluate_stage
        engine = trainer.engine
        # Through the engine (ZeRO-3 gathers collectively; sequence-parallel as trained); logits
        # only where the metrics need them.
        forward = ModelForward(trainer.model, call=engine, device=trainer.device)
        sink = trainer.callback(WandbSink)
        engine.eval()
        record.update(evaluate_stage(forward, trainer.cfg, plan, RunDir(trainer.run_dir).eval_dir(plan.name),
                                     write=trainer.rank == 0, wandb_run=sink.run if sink else None))
        engine.train()
