"""Export and warm starts as Trainer callbacks (plugged in by moetrain/compose.py)."""
from __future__ import annotations

from moetrain.checkpoint import RunDir
from moetrain.train.callback import Callback


class ExportCallback(Callback):
    """export.enabled: at the end of training rank 0 exports the final checkpoint to
    RUN_DIR/export (complete: saving ends in a barrier) while the other ranks leave:
    no collective waits on it, so a long CPU export or --verify cannot run into the
    process-group timeout. Launchers wait for every rank anyway."""

    priority = -10  # after the final checkpoint (0)

    def on_train_end(self, trainer) -> None:
        e = trainer.cfg.export
        if not e.enabled or trainer.rank != 0 or trainer.stop_reason:
            return  # a stopped (preempted) run is not finished: the relaunch exports
        from moetrain.export import export_checkpoint
        export_checkpoint(trainer.run_dir, RunDir(trainer.run_dir).export, dtype=e.dtype, shard_size=e.shard_size,
                          verify=e.verify, allow_approx=e.allow_approx)


class WarmStartCallback(Callback):
    """model.init_from: copy an HF folder's or a moetrain run's weights into the fresh
    model before expert parallelism shards it (not when resuming a checkpoint)."""

    def on_model_built(self, trainer, model) -> None:
        if trainer.cfg.model.init_from:
            from moetrain.export import init_from
            init_from(model, trainer.cfg.model.init_from)
