"""Checkpoints: DeepSpeed engine state plus our client state, marker written last.

checkpoints/<tag>/
  (DeepSpeed files)        model + optimizer (+ ZeRO partitions)
  client_state.json        step, stage, tokens, config, W&B id, world size
  rank<r>.json             per-rank data-loader and Python/NumPy RNG state
  rank<r>_torch_rng.pt     per-rank torch RNG (loaded with weights_only=True)
  COMPLETE                 written by rank 0 after every rank finished
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, MARKER))


def list_complete(ckpt_root: str) -> list[str]:
    """Complete checkpoint folders, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    dirs = [os.path.join(ckpt_root, d) for d in sorted(os.listdir(ckpt_root)) if d.startswith("step_")]
    return [d for d in dirs if is_complete(d)]


def newest_complete(ckpt_root: str) -> Optional[str]:
    done = list_complete(ckpt_root)
    return done[-1] if done else None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(state: dict, torch_rng: torch.Tensor) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch_rng)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def save(engine, ckpt_root: str, step: int, client: dict, rank_state: dict, rank: int, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = tag_for(step)
    path = os.path.join(ckpt_root, tag)
    if rank == 0 and os.path.isdir(path) and not is_complete(path):
        shutil.rmtree(path)  # leftover of a run killed while saving this very step
    barrier()
    engine.save_checkpoint(ckpt_root, tag=tag, save_latest=False)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"rank{rank}.json"), "w") as f:
        json.dump({**rank_state, "rng": _rng_state()}, f)
    torch.save(torch.get_rng_state(), os.path.join(path, f"rank{rank}_torch_rng.pt"))
    if rank == 0:
        with open(os.path.join(path, "client_state.json"), "w") as f:
            json.dump(client, f, indent=1)
    barrier()
    if rank == 0:
        with open(os.path.join(path, MARKER), "w") as f:
            f.write(str(step))
        prune(ckpt_root, keep_last)
    barrier()
    return path


def prune(ckpt_root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and any
    incomplete folder older than the newest complete one."""
    done = list_complete(ckpt_root)
    if not done:
        return
    keep = set(done[-keep_last:])
    newest = os.path.basename(done[-1])
    for d in sorted(os.listdir(ckpt_root)):
        full = os.path.join(ckpt_root, d)
        if d.startswith("step_") and full not in keep and (is_complete(full) or d < newest):
            shutil.rmtree(full, ignore_errors=True)


def read_client_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "client_state.json")) as f:
        return json.load(f)


def load(engine, ckpt_dir: str, rank: int, world: int) -> tuple[dict, dict]:
    """Collective. Restores engine + RNG; returns (client_state, this rank's state)."""
    client = read_client_state(ckpt_dir)
    if client["world_size"] != world:
        raise ValueError(f"checkpoint {ckpt_dir} was written by {client['world_size']} processes but this "
                         f"launch has {world}; relaunch with {client['world_size']} or start a new run dir")
    root, tag = os.path.split(os.path.normpath(ckpt_dir))
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not read checkpoint {ckpt_dir}; it may be corrupt - "
                         "pass an older one with --resume PATH")
    with open(os.path.join(ckpt_dir, f"rank{rank}.json")) as f:
        rank_state = json.load(f)
    torch_rng = torch.load(os.path.join(ckpt_dir, f"rank{rank}_torch_rng.pt"), weights_only=True)
    _set_rng_state(rank_state.pop("rng"), torch_rng)
    return client, rank_state
