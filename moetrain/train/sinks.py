"""Metrics sinks, each a Trainer callback writing on rank 0 only: metrics.jsonl,
the console (tqdm or plain lines) and W&B."""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from typing import Optional

from moetrain.checkpoint import RunDir, truncate_metrics
from moetrain.config import to_dict
from moetrain.train.callback import Callback
from moetrain.train.metrics import wandb_mode

SINK_PRIORITY = -100  # close files and the W&B run after every other callback is done


class JsonlSink(Callback):
    """RUN_DIR/metrics.jsonl: one JSON object per logged step or event. On resume the
    records past the checkpoint's step (written by the run that died) are dropped,
    since they are about to be recomputed: one line per step."""

    priority = SINK_PRIORITY

    def on_train_start(self, trainer) -> None:
        self.path = RunDir(trainer.run_dir).metrics
        if trainer.rank == 0 and trainer.resumed_from:
            truncate_metrics(self.path, trainer.state.step)

    def _write(self, trainer, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    log_metrics = log_event = _write


class ConsoleSink(Callback):
    """A progress line per logged step and a line per event on stderr/stdout."""

    priority = SINK_PRIORITY

    def __init__(self, style: str = "tqdm"):
        self.style, self.bar = style, None

    def on_train_start(self, trainer) -> None:
        self.total, self.step0, self.t0 = trainer.total, trainer.state.step, time.time()
        if trainer.rank == 0 and self.style == "tqdm":
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=self.step0, desc="train", dynamic_ncols=True, file=sys.stderr)

    def _print(self, line: str) -> None:
        (self.bar.write if self.bar is not None else lambda s: print(s, flush=True))(line)

    def log_metrics(self, trainer, rec: dict) -> None:
        done = rec["step"] - self.step0
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - rec["step"])
        gn = "" if rec.get("grad_norm") is None else f"gnorm {rec['grad_norm']:.3f} "
        if self.bar is not None:
            self.bar.n = rec["step"]
            self.bar.set_postfix_str(f"loss {rec['loss']:.3f} tok/s {rec['tokens_per_s']:.0f}")
        self._print(f"step {rec['step']}/{self.total} [{rec['stage']}] loss {rec['loss']:.4f} {gn}"
                    f"lr {rec['lr']:.2e} tok/s {rec['tokens_per_s']:.0f} mfu {100 * rec['mfu']:.1f}% "
                    f"eta {eta / 60:.1f}m")

    def log_event(self, trainer, rec: dict) -> None:
        self._print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))

    def _close(self, trainer, *_) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_train_end = on_error = _close


class WandbSink(Callback):
    """W&B run in RUN_DIR/wandb ('online' falls back to offline without an API key).
    Its id is kept in the checkpoint so that a resumed run continues the same W&B run."""

    priority = SINK_PRIORITY

    def __init__(self):
        self.wandb_id: Optional[str] = None
        self.run = None

    def state_dict(self) -> dict:
        return {"wandb_id": self.wandb_id}

    def load_state_dict(self, state: dict) -> None:
        self.wandb_id = state.get("wandb_id")

    def on_train_start(self, trainer) -> None:
        cfg = trainer.cfg
        mode = wandb_mode(cfg.logging.wandb.mode)
        if trainer.rank != 0 or mode == "disabled":
            return
        import wandb
        w = cfg.logging.wandb
        self.wandb_id = self.wandb_id or secrets.token_hex(4)  # not the global RNG: resume stays exact
        self.run = wandb.init(project=w.project, entity=w.entity, name=w.name or os.path.basename(trainer.run_dir),
                              tags=list(w.tags), config=to_dict(cfg), dir=trainer.run_dir, id=self.wandb_id,
                              resume="allow", mode=mode)

    def log_metrics(self, trainer, rec: dict) -> None:
        if self.run is None:
            return
        import wandb
        flat = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
        # Per-expert token shares: one histogram per layer and step.
        flat.update({k: wandb.Histogram(v) for k, v in rec.items() if isinstance(v, list) and v})
        flat["stage"] = rec.get("stage")
        self.run.log(flat, step=rec["step"])

    def log_event(self, trainer, rec: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"},
                         step=rec["step"])

    def _close(self, trainer, *_) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    on_train_end = on_error = _close
