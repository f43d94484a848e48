"""Saving and loading one checkpoint during training: DeepSpeed's engine state, our
client state, per-rank RNG/loader state and, under expert parallelism, each EP rank's
expert shard. Collective: every rank calls save/load. The COMPLETE marker is written
last, after a barrier, so a folder without it is never resumed from; everything is
written under temporary names first (see save)."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from moetrain.checkpoint import layout, reshard
from moetrain.checkpoint.experts import load_expert_shards, save_expert_shards
from moetrain.parallel.dims import barrier

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


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, permissions): the previous checkpoint is untouched."""


def _atomic_write(path: str, write) -> None:
    """write(f) into a temporary sibling, fsync, then rename: a reader (or a resume
    after a kill) sees the old file or the whole new one, never half of it."""
    tmp = f"{path}{layout.TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.filename is None:  # torch.save and friends raise without naming the file
            e.filename = path
        raise


def _write_json(path: str, obj: dict, indent: Optional[int] = None) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def _save_token(engine) -> int:
    """Rank 0's pid, the same on every rank: it names the temporary tag folder."""
    t = torch.tensor([os.getpid()], dtype=torch.int64, device=engine.device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(t, 0)
    return int(t.item())


def _any_rank(flag: bool, engine) -> bool:
    t = torch.tensor([float(flag)], device=engine.device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _clear_leftovers(ckpt_root: str) -> None:
    """Rank 0, before a save (one writer per run folder): temporary folders of killed
    saves, and step folders without a marker (a kill between rename and marker)."""
    if not os.path.isdir(ckpt_root):
        return
    for d in os.listdir(ckpt_root):
        full = os.path.join(ckpt_root, d)
        stale = layout.is_tmp(d) or not layout.is_complete(full)
        if d.startswith(layout.TAG_PREFIX) and os.path.isdir(full) and stale:
            shutil.rmtree(full, ignore_errors=True)


def _write_rank_files(engine, ckpt_root: str, tmp_tag: str, client: dict, rank_state: dict, rank: int,
                      ep_groups: Optional[EPGroups]) -> None:
    tmp = os.path.join(ckpt_root, tmp_tag)
    engine.save_checkpoint(ckpt_root, tag=tmp_tag, save_latest=False)
    if ep_groups is not None:  # inside the temporary folder: the rename makes it atomic
        save_expert_shards(engine.module, tmp, ep_groups)
    os.makedirs(tmp, exist_ok=True)
    _write_json(layout.rank_state_path(tmp, rank), {**rank_state, "rng": _rng_state()})
    _atomic_write(layout.torch_rng_path(tmp, rank), lambda f: torch.save(torch.get_rng_state(), f))
    if rank == 0:  # + the optimizer's parameter names: what lets reshard.py re-split ZeRO-0 state
        client = {**client, reshard.OPTIM_NAMES: reshard.optimizer_param_names(engine)}
        _write_json(os.path.join(tmp, layout.CLIENT_STATE), client, indent=1)


def _save_failed(e: Optional[OSError], tmp: str, ckpt_root: str) -> CheckpointSaveError:
    why = "no space left on device" if e is not None and e.errno == errno.ENOSPC else (
        e.strerror if e is not None and e.strerror else "another rank failed")
    where = e.filename if e is not None and e.filename else tmp
    prev = layout.newest_complete(ckpt_root)
    keep = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    return CheckpointSaveError(f"checkpoint save failed writing {where}: {why}; {keep} - free space "
                               "and run the same command again to resume")


def save(engine, ckpt_root: str, step: int, client: dict, rank_state: dict, rank: int, keep_last: int,
         ep_groups: Optional[EPGroups] = None) -> str:
    """Collective. Writes RUN_DIR/checkpoints/step_%08d and returns that folder.
    Every rank writes into step_%08d.tmp-<pid>; once all finished, rank 0 renames
    it and then writes the COMPLETE marker (atomically), so a kill at any moment
    leaves either the old set of checkpoints or the new complete one."""
    final = os.path.join(ckpt_root, layout.tag_for(step))
    tmp_tag = layout.tmp_tag_for(step, _save_token(engine))
    tmp = os.path.join(ckpt_root, tmp_tag)
    if rank == 0:
        _clear_leftovers(ckpt_root)
    barrier()
    error = None
    try:
        _write_rank_files(engine, ckpt_root, tmp_tag, client, rank_state, rank, ep_groups)
    except OSError as e:
        error = e
    if _any_rank(error is not None, engine):  # agreed, so that no rank waits for a failed one
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise _save_failed(error, tmp, ckpt_root)
    if rank == 0:
        if os.path.isdir(final):  # a complete save of this very step (saved twice): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_json(os.path.join(final, layout.MARKER), step)  # the marker's content: the step
        prune(ckpt_root, keep_last)
    barrier()
    return final


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


def _safe_checkpoint_engine(inner):
    """DeepSpeed's engine unpickles with weights_only=False (any code a checkpoint
    carries would run); this one loads every file as consolidate does: weights_only=True
    with DeepSpeed's plain records allowlisted. Saving stays DeepSpeed's."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from moetrain.checkpoint.consolidate import _ds_records, _load
    if getattr(inner, "weights_only", False):
        return inner

    class WeightsOnlyCheckpointEngine(type(inner)):
        weights_only = True

        def load(self, path: str, map_location=None):
            sd = _load(path, _ds_records())
            on_cpu = map_location is None or callable(map_location) or torch.device(map_location).type == "cpu"
            return sd if on_cpu else _to(sd, map_location)

    assert isinstance(inner, TorchCheckpointEngine), f"unexpected DeepSpeed checkpoint engine {type(inner)}"
    inner.__class__ = WeightsOnlyCheckpointEngine  # keeps its serialization settings for saves
    return inner


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def load(engine, ckpt_dir: str, rank: int, world: int,
         ep_groups: Optional[EPGroups] = None) -> tuple[dict, dict]:
    """Collective. Restores engine (+ expert shards) and RNG; returns (client_state, this rank's state).
    A checkpoint of another layout (process count, ZeRO stage, model.moe.ep_size) is re-split
    (reshard.py); the same layout loads through DeepSpeed, bit for bit."""
    client = read_client_state(ckpt_dir)
    if "config" not in client and client["world_size"] != world:  # a bare save (tests): no layout to re-split from
        raise ValueError(f"checkpoint {ckpt_dir} was written by {client['world_size']} processes but this "
                         f"launch has {world}; relaunch with {client['world_size']} or start a new run dir")
    if "config" in client and reshard.saved_layout(client) != reshard.current_layout(engine, world, ep_groups):
        reshard.load_resharded(engine, ckpt_dir, client, world, ep_groups)
        rank_state, torch_rng = reshard.rank_state(ckpt_dir, client, rank)
        _set_rng_state(rank_state.pop("rng"), torch_rng)
        return client, rank_state
    root, tag = os.path.split(os.path.normpath(ckpt_dir))
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
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
