"""The Trainer: owns the training state and the fit loop (stages in order, optimizer
steps); everything else plugs in as a Callback (moetrain/train/callback.py).

    trainer = Trainer(cfg, run_dir, callbacks, resume="auto")
    state = trainer.fit()

Setup order: process group, config checks, resume policy, data, the plain model
(`on_model_built`), parallelize(model, dims, cfg), the DeepSpeed engine, restore.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from moetrain import checkpoint as ckpt
from moetrain.checkpoint.reshard import global_batch_note
from moetrain.config import ConfigError, TrainConfig, config_from_dict, dump_yaml, to_dict, validate
from moetrain.model import build_model
from moetrain.parallel import ParallelDims, barrier, parallelize
from moetrain.parallel.engine import build_engine, device_for, init_distributed, set_engine_batch
from moetrain.train.callback import Callback
from moetrain.train.collector import MetricsCollector, all_reduce_sum
from moetrain.train.schedule import StagePlan, lr_at, plan_stages, total_steps
from moetrain.train.step import StepMetrics, train_step


@dataclass
class TrainState:
    step: int = 0              # optimizer steps over all stages
    stage: int = 0             # index into the stage plan
    step_in_stage: int = 0
    tokens: int = 0            # label tokens seen over all ranks (pending ones: Trainer.sync_tokens)
    history: list = field(default_factory=list)  # stage-end records
    stop_reason: Optional[str] = None  # why request_stop() ended the run (not saved: a relaunch continues)
    stop_ok: bool = True               # False: a guard stopped a failing run (non-zero exit)

    def client_state(self) -> dict:
        return {"step": self.step, "stage": self.stage, "step_in_stage": self.step_in_stage,
                "tokens": self.tokens, "history": self.history}

    @classmethod
    def from_client_state(cls, c: dict) -> "TrainState":
        return cls(c["step"], c["stage"], c["step_in_stage"], c["tokens"], c.get("history", []))


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill derived defaults so config.yaml records exactly what ran."""
    d = to_dict(cfg)
    if d["model"]["max_position_embeddings"] is None:
        d["model"]["max_position_embeddings"] = max(s["seq_len"] for s in d["stages"])
    return config_from_dict(d)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str, callbacks: list[Callback] = (), resume: str = "auto",
                 overwrite: bool = False, local_rank: Optional[int] = None):
        if device_for(local_rank or 0).type == "cpu":  # first, before any tensor exists
            from moetrain.train.host_alloc import apply_host_memory
            apply_host_memory(cfg)  # reuse freed buffers (~10% faster steps) or release them (less RSS)
        self.rank, self.world, local = init_distributed(local_rank)
        validate(cfg, self.world)
        self.cfg, self.run_dir = resolve_config(cfg), run_dir
        self.device = device_for(local)
        # Stable sort: descending priority, equal priorities in the order given.
        self.callbacks = sorted([*callbacks, MetricsCollector()], key=lambda c: -c.priority)
        self.resumed_from = ckpt.prepare_run_dir(run_dir, resume, overwrite, self.rank)
        if self.resumed_from:
            ckpt.check_same_model(self.cfg, self.resumed_from)
            from moetrain.parallel.sequence import check_resume_size
            check_resume_size(self.cfg, ckpt.read_client_state(self.resumed_from), self.resumed_from)
        # Batches per step: sequence-parallel groups share one (deepspeed.sequence_parallel_size).
        self.plans: list[StagePlan] = plan_stages(self.cfg, self.world // self.cfg.deepspeed.sequence_parallel_size)
        self.total = total_steps(self.plans, self.cfg.train.max_steps)
        self.state = TrainState()
        self.loader = None                          # the current stage's training loader
        self.lr = 0.0
        self.step_metrics: Optional[StepMetrics] = None
        self.step_loss: Optional[torch.Tensor] = None  # set before post_backward (see _post_backward)
        self.skip_update = False                    # a post_backward hook drops this step's update
        self._pending_tokens: Optional[torch.Tensor] = None  # tokens of steps not yet synced
        self._resume_loader_state: Optional[dict] = None
        self._reload: Optional[tuple] = None        # (checkpoint, then): see request_reload
        self.step_seconds = 0.0                     # host time inside train_step, summed
        self.start_time = time.time()
        self._prepare_data()
        self._build()
        self._write_config()  # last: a setup error (data, shapes, warm start) leaves the run folder as it was

    # ------------------------------------------------------------------ setup
    def _write_config(self) -> None:
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(ckpt.RunDir(self.run_dir).config, "w") as f:
                f.write(dump_yaml(self.cfg))

    def _prepare_data(self) -> None:
        from moetrain.data import ensure_prepared, load_tokenizer
        from moetrain.data.shards import check_prepared
        if self.rank == 0:
            for plan in self.plans:
                ensure_prepared(plan.data)
        barrier()
        for plan in self.plans:  # damaged shards fail now, before the run folder is touched
            check_prepared(plan.data.dir, plan.data.verify_shards)
        data_dir = self.plans[0].data.dir
        vocab = load_tokenizer(data_dir).vocab_size
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(f"tokenizer in {data_dir} has {vocab} pieces but model.vocab_size="
                              f"{self.cfg.model.vocab_size}; set model.vocab_size >= {vocab}")

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        model = build_model(cfg.model)
        if self.resumed_from is None:
            self.dispatch("on_model_built", model)
        if cfg.train.precision == "fp32":
            model = model.float()
        self.param_counts = model.param_counts()  # of the plain model: before EP shards or ZeRO-3 partitions
        self.parallel = parallelize(model, ParallelDims.from_config(cfg, self.world, self.rank), cfg)
        plan0 = self.plans[0]
        self.model = model
        self.engine = build_engine(model, cfg, self.parallel, plan0.micro_batch_size, plan0.grad_accum_steps)
        if self.resumed_from:
            self._restore(self.resumed_from)

    def _restore(self, ckpt_dir: str) -> None:
        client, rank_state = ckpt.load(self.engine, ckpt_dir, self.rank, self.world, self.parallel.ep_groups)
        note = global_batch_note(client, self.cfg, self.parallel.dims.dp)  # resumed on another world size
        if note and self.rank == 0:
            print(note, file=sys.stderr)
        self.state = TrainState.from_client_state(client)
        self._resume_loader_state = rank_state.get("loader")
        for cb in self.callbacks:
            cb.load_state_dict(client)

    # ------------------------------------------------------------------ callbacks
    def dispatch(self, hook: str, *args) -> None:
        """Call `hook` on every callback, in priority order."""
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def callback(self, kind: type) -> Optional[Callback]:
        """The first callback of type `kind`, or None."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

    def log_event(self, record: dict) -> None:
        if self.rank == 0:
            self.dispatch("log_event", record)

    # ------------------------------------------------------------------ state for checkpoints
    def take_pending_tokens(self) -> torch.Tensor:
        """This rank's label tokens of the steps since the last sync (device, int64);
        the caller adds their sum over ranks to state.tokens."""
        t = self._pending_tokens
        self._pending_tokens = None
        return t if t is not None else torch.zeros((), dtype=torch.int64, device=self.device)

    def sync_tokens(self) -> int:
        """Fold the pending tokens into state.tokens (collective; one host sync)."""
        t = all_reduce_sum(self.take_pending_tokens().to(torch.float64))
        self.state.tokens += int(t)
        return self.state.tokens

    def record_metrics(self, metrics: dict) -> None:
        """Host values to add to this step's log record (call at log steps, before the
        MetricsCollector runs: from post_step of a callback with priority > 50)."""
        self.callback(MetricsCollector).extra.update(metrics)

    def client_state(self) -> dict:
        """What rank 0 writes to client_state.json: trainer state, run identity and
        every callback's state (their own top-level keys)."""
        self.sync_tokens()
        out = {**self.state.client_state(), "world_size": self.world,
               "stage_name": self.plans[self.state.stage].name, "config": to_dict(self.cfg)}
        for cb in self.callbacks:
            extra = cb.state_dict()
            clash = set(extra) & set(out)
            assert not clash, f"{type(cb).__name__} state keys {clash} clash with the trainer's or another's"
            out.update(extra)
        return out

    def rank_state(self) -> dict:
        return {"loader": self.loader.state_dict() if self.loader is not None else None}

    # ------------------------------------------------------------------ fit loop
    def fit(self) -> TrainState:
        try:
            self.dispatch("on_train_start")
            while self.state.stage < len(self.plans) and self.state.step < self.total and not self.stop_reason:
                self._run_stage(self.plans[self.state.stage])
            self.dispatch("on_train_end")
        except BaseException as e:
            self.dispatch("on_error", e)
            raise
        return self.state

    def _enter_stage(self, plan: StagePlan) -> None:
        ckpt.apply_stage(self.model, plan)
        set_engine_batch(self.engine, plan.micro_batch_size, plan.grad_accum_steps, self.parallel.dims.zero_world)
        self.loader = self.make_loader(plan)
        if self._resume_loader_state is not None:
            self.loader.load_state_dict(self._resume_loader_state)
            self._resume_loader_state = None
        self.dispatch("on_stage_start", plan)

    def make_loader(self, plan: StagePlan, split: str = "train"):
        """This rank's loader of `plan`'s data; split "eval" reads the held-out documents.
        Sequence parallelism: the group reads one batch and each rank keeps its shard."""
        from moetrain.data import TokenLoader
        from moetrain.parallel.sequence import sharded_loader
        data = plan.data if split == "train" else dataclasses.replace(plan.data, split=split)
        dims = self.parallel.dims
        loader = TokenLoader(data, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
                             dp_rank=dims.dp_rank, dp_world=dims.dp, seed=self.cfg.seed + 1000 * plan.index,
                             split=split, doc_masking=plan.attention.doc_masking)
        return sharded_loader(loader, dims)

    def _run_stage(self, plan: StagePlan) -> None:
        s, cfg = self.state, self.cfg
        self._enter_stage(plan)
        while s.step_in_stage < plan.steps and s.step < self.total and not self.stop_reason:
            self.lr = lr_at(s.step_in_stage, plan, cfg.optim.schedule, cfg.optim.min_lr_ratio,
                            cfg.optim.decay_fraction, cfg.optim.decay_shape)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = self.lr
            self.dispatch("pre_step")
            t0 = time.perf_counter()
            m = train_step(self.engine, self.loader, plan.grad_accum_steps, self.device, self.parallel.ep_group,
                           post_backward=self._post_backward)
            self.step_seconds += time.perf_counter() - t0
            self.step_metrics = m
            self._pending_tokens = m.tokens if self._pending_tokens is None else self._pending_tokens + m.tokens
            s.step += 1
            s.step_in_stage += 1
            self.dispatch("post_step")
            if self._reload is not None:
                self._reload_now()
                return  # fit() re-enters the restored stage (fresh loader, RoPE, batch shape)
        stage_done = s.step_in_stage >= plan.steps
        if stage_done or s.step >= self.total:
            self.sync_tokens()
            record = {"step": s.step, "stage": plan.name, "event": "stage_end" if stage_done else "run_end",
                      "tokens": s.tokens}
            self.dispatch("on_stage_end", plan, record)
            s.history.append(record)
            self.log_event(record)
        if stage_done:
            self.loader = None  # the next stage starts a fresh loader
            if s.stage + 1 < len(self.plans):
                s.stage += 1
                s.step_in_stage = 0

    def _post_backward(self, loss: torch.Tensor) -> bool:
        """The step's mean loss (device) is trainer.step_loss for post_backward hooks; a hook
        sets trainer.skip_update = True (the same on every rank) to drop this update."""
        self.step_loss, self.skip_update = loss, False
        self.dispatch("post_backward")
        return self.skip_update

    def _reload_now(self) -> None:
        ckpt_dir, then = self._reload
        self._reload, self.loader, self._pending_tokens = None, None, None  # the steps since are undone
        reason, ok = self.state.stop_reason, self.state.stop_ok
        self._restore(ckpt_dir)
        self.state.stop_reason, self.state.stop_ok = reason, ok
        self.callback(MetricsCollector).on_train_start(self)  # token rates count from the restored state
        if then is not None:
            then(self)

    # ------------------------------------------------------------------ helpers for callbacks
    def request_reload(self, ckpt_dir: str, then=None) -> None:
        """Once this step's post_step callbacks are done, reload the complete checkpoint
        `ckpt_dir` as a resume would (weights, optimizer, RNG, trainer state, loader position,
        every callback's state) and continue from its step; `then(trainer)` runs right after
        (e.g. to move trainer._resume_loader_state on). Every rank must ask at the same step."""
        self._reload = (ckpt_dir, then)

    @property
    def reload_pending(self) -> bool:
        """request_reload was called this step: the step's state is about to be replaced."""
        return self._reload is not None

    def request_stop(self, reason: str, ok: bool = True) -> None:
        """End training after the current step's callbacks, as the step cap does:
        on_train_end still runs (final checkpoint), and a later launch continues.
        Every rank must ask at the same step. ok=False: the run failed (exit code 1)."""
        self.state.stop_reason, self.state.stop_ok = reason, ok

    @property
    def stop_reason(self) -> Optional[str]:
        return self.state.stop_reason

    def is_log_step(self, step: Optional[int] = None) -> bool:
        step = self.state.step if step is None else step
        return step % self.cfg.logging.every_steps == 0 or step == 1

    @property
    def plan(self) -> StagePlan:
        return self.plans[min(self.state.stage, len(self.plans) - 1)]
