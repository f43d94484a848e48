"""Workers of the 2-process guard tests (spawned: importable by name, no test collection)."""
from __future__ import annotations

import hashlib
import json
import os
import socket

import torch

from moetrain.train.callback import Callback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PoisonOneRank(Callback):
    """On rank `rank` only, before the guards see step `step`: a NaN loss or an Inf in one
    gradient this rank holds. Records, on every rank, whether each step was skipped and
    whether the weights moved over it."""

    priority = 150

    def __init__(self, rank, step, where):
        self.rank, self.step, self.where = rank, step, where
        self.skipped, self.moved = {}, {}

    def pre_step(self, trainer):
        self._before = [p.detach().clone() for p in trainer.model.parameters()]

    def post_backward(self, trainer):
        if trainer.rank != self.rank or trainer.state.step + 1 != self.step:
            return
        if self.where == "loss":
            trainer.step_loss = trainer.step_loss * float("nan")
        else:
            next(p.grad for p in trainer.model.parameters() if p.grad is not None).view(-1)[0] = float("inf")

    def post_step(self, trainer):
        s = trainer.state.step
        self.skipped[s] = bool(trainer.skip_update)
        self.moved[s] = not all(torch.equal(a, b.detach()) for a, b in zip(self._before, trainer.model.parameters()))

    def on_train_end(self, trainer):
        h = hashlib.sha256()
        for p in trainer.model.parameters():
            h.update(p.detach().cpu().float().numpy().tobytes())
        self.digest = h.hexdigest()


def nan_on_one_rank(rank: int, world: int, port: int, overrides: list, run_dir: str, out: str, where: str) -> None:
    """Train with a NaN/Inf on rank 1 only at step 3; write what every rank saw to out/rank{r}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from moetrain.compose import train
    from moetrain.config import load_config
    from train_helpers import ROOT
    cb = PoisonOneRank(1, 3, where)
    state = train(load_config(os.path.join(ROOT, "configs", "default.yaml"), overrides), run_dir, resume="never",
                  callbacks=[cb])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"step": state.step, "skipped": cb.skipped, "moved": cb.moved, "digest": cb.digest}, f)
    torch.distributed.destroy_process_group()
