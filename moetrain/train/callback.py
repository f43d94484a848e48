"""The callback protocol of the Trainer (after OLMo-core's).

Every concern that is not the fit loop itself (checkpointing, metrics sinks,
evaluation, MoE router handling, export, guards) is a Callback. The Trainer
calls each hook on all callbacks in descending `priority`; equal priorities
keep the order they were given in. Priorities of the stock callbacks, so that
a new one can slot in between:

    200  MoERouterCallback   bias update and router window, before anything reads them
    100  NonFiniteGuard      NaN / Inf check (and the step's loss over ranks) before it is logged or saved
     90  SpikeGuard          loss-spike check on that loss: log, skip, or roll back to a checkpoint
     50  MetricsCollector    built into the Trainer: one reduction + host sync per log step,
                             then `log_metrics` to every callback
     40  HeldOutEvalCallback periodic held-out loss (after the step is logged)
      0  CheckpointCallback  saves last, when every other callback's state is final
    -10  export              after the final checkpoint exists
   -100  metrics sinks       close their files / W&B run last
   -200  PreemptionCallback  checks for SIGTERM/SIGINT after the periodic save; restores the
                             signal handlers after the final one

A callback that keeps state returns it from `state_dict()` (JSON-serialisable,
top-level keys it owns) and gets the checkpoint's client state back in
`load_state_dict()` before `on_train_start`.
"""
from __future__ import annotations


class Callback:
    """Base class: every hook is a no-op."""

    priority: int = 0

    def on_model_built(self, trainer, model) -> None:
        """The plain model, seeded and built, before parallelism and the optimizer
        (warm starts). Not called when resuming from a checkpoint."""

    def on_train_start(self, trainer) -> None:
        """After the engine is built and any checkpoint restored."""

    def on_stage_start(self, trainer, plan) -> None:
        """RoPE, attention and batch shape of `plan` are in place."""

    def pre_step(self, trainer) -> None:
        """Before the first micro-batch of an optimizer step; trainer.lr is set."""

    def post_backward(self, trainer) -> None:
        """Gradients of the whole step are complete, the optimizer has not stepped."""

    def post_step(self, trainer) -> None:
        """After the optimizer step; trainer.step_metrics holds the step's tensors
        (nothing has been copied to the host)."""

    def log_metrics(self, trainer, record: dict) -> None:
        """A logged step's record (host values, reduced over ranks). Rank 0 only."""

    def log_event(self, trainer, record: dict) -> None:
        """A non-step record (evaluations, stage ends). Rank 0 only."""

    def on_checkpoint(self, trainer, path: str) -> None:
        """A complete checkpoint was written to `path`."""

    def on_stage_end(self, trainer, plan, record: dict) -> None:
        """The stage finished (or the step cap ended it): add results to `record`,
        which is then kept in the run history and logged as an event."""

    def on_train_end(self, trainer) -> None:
        """The fit loop finished normally."""

    def on_error(self, trainer, exc: BaseException) -> None:
        """The fit loop raised `exc` (re-raised after every callback saw it)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
