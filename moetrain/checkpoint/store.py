"""Saving and loading one checkpoint during training: DeepSpeed's engine state, our
client state, per-rank RNG/loader state and, under expert parallelism, each EP rank's
expert shard. Collective: every rank calls save/load. The COMPLETE marker is written
last, after a barrier, so a folder without it is never resumed from."""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from moetrain.checkpoint import layout
from moetrain.parallel.dims import barrier
from moetrain.checkpoint.experts import load_expert_shards, save_expert_shards

if TYPE_CHECKING:
    from moetrain.parallel.expert_parallel import EPGroups


def _rng_state() -> dict:
    # JSON, not pickle: rank{r}.json stays readable and loads without unpickling anything
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(state: dict, torch_rng: torch.Tensor) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch_rng)


def _write_json(path: str, obj: dict, indent: Optional[int] = None) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)


def save(engine, ckpt_root: str, step: int, client: dict, rank_state: dict, rank: int, keep_last: int,
         ep_groups: Optional[EPGroups] = None) -> str:
    """Collective. Writes RUN_DIR/checkpoints/step_%08d and returns that folder."""
    tag = layout.tag_for(step)
    path = os.path.join(ckpt_root, tag)
    if rank == 0 and os.path.isdir(path) and not layout.is_complete(path):
        shutil.rmtree(path)  # leftover of a run killed while saving this very step
    barrier()
    engine.save_checkpoint(ckpt_root, tag=tag, save_latest=False)
    if ep_groups is not None:
        save_expert_shards(engine.module, path, ep_groups)
    os.makedirs(path, exist_ok=True)
    _write_json(layout.rank_state_path(path, rank), {**rank_state, "rng": _rng_state()})
    torch.save(torch.get_rng_state(), layout.torch_rng_path(path, rank))
    if rank == 0:
        _write_json(os.path.join(path, layout.CLIENT_STATE), client, indent=1)
    barrier()
    if rank == 0:
        with open(os.path.join(path, layout.MARKER), "w") as f:
            f.write(str(step))
        prune(ckpt_root, keep_last)
    barrier()
    return path


def prune(ckpt_root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and any
    incomplete folder older than the newest complete one."""
    done = layout.list_complete(ckpt_root)
    if not done:
        return
    keep = set(done[-keep_last:])
    newest = os.path.basename(done[-1])
    for d in sorted(os.listdir(ckpt_root)):
        full = os.path.join(ckpt_root, d)
        if d.startswith(layout.TAG_PREFIX) and full not in keep and (layout.is_complete(full) or d < newest):
            shutil.rmtree(full, ignore_errors=True)


def read_client_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, layout.CLIENT_STATE)) as f:
        return json.load(f)


def load(engine, ckpt_dir: str, rank: int, world: int,
         ep_groups: Optional[EPGroups] = None) -> tuple[dict, dict]:
    """Collective. Restores engine (+ expert shards) and RNG; returns (client_state, this rank's state)."""
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
    if ep_groups is not None:  # after DeepSpeed, whose module file holds rank 0's experts only
        load_expert_shards(engine.module, ckpt_dir, ep_groups)
    with open(layout.rank_state_path(ckpt_dir, rank)) as f:
        rank_state = json.load(f)
    torch_rng = torch.load(layout.torch_rng_path(ckpt_dir, rank), weights_only=True)
    _set_rng_state(rank_state.pop("rng"), torch_rng)
    return client, rank_state
