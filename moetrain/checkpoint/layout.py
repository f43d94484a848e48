"""Every file and folder name of the run folder and of one checkpoint, spelled once.

RUN_DIR/
  config.yaml              fully resolved config
  metrics.jsonl            one JSON object per logged step (+ stage-end records)
  wandb/  export/  eval/<stage>/
  checkpoints/step_%08d/   one checkpoint (a "tag"):
    (DeepSpeed files)      mp_rank_00_model_states.pt, *zero_pp_rank_*_optim_states.pt, ...
    client_state.json      step, stage, tokens, config, W&B id, world size
    rank{r}.json           per-rank data-loader and Python/NumPy RNG state
    rank{r}_torch_rng.pt   per-rank torch RNG
    experts_ep{r}.pt       expert-parallel rank r's expert slices
    COMPLETE               written last, by rank 0, once every rank finished
  checkpoints/step_%08d.tmp-<pid>/   a save in progress (renamed to step_%08d once every
                           rank finished, before COMPLETE is written; never resumed from)
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Optional

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
WANDB = "wandb"
EXPORT = "export"
EVAL = "eval"

TAG_PREFIX = "step_"
TMP_MARK = ".tmp-"   # tag.tmp-<rank 0 pid>: a save in progress
MARKER = "COMPLETE"
CLIENT_STATE = "client_state.json"
DS_MODEL_FILE = "mp_rank_00_model_states.pt"   # DeepSpeed's module file at ZeRO 0-2 (rank 0 only)
ZERO_OPTIM_GLOB = "*zero_pp_rank_*_optim_states.pt"   # also bf16_zero_pp_rank_* (bf16 at stage 0)
ZERO_MODEL_GLOB = "*zero_pp_rank_*_model_states.pt"   # ZeRO-3: one module file per rank
EXPERT_SHARD_GLOB = "experts_ep*.pt"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def tmp_tag_for(step: int, token: int) -> str:
    return f"{tag_for(step)}{TMP_MARK}{token}"


def is_tmp(name: str) -> bool:
    return TMP_MARK in os.path.basename(name)


def rank_state_path(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, f"rank{rank}.json")


def torch_rng_path(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, f"rank{rank}_torch_rng.pt")


def expert_shard_path(ckpt_dir: str, ep_rank: int) -> str:
    return os.path.join(ckpt_dir, f"experts_ep{ep_rank}.pt")


def has_expert_shards(ckpt_dir: str) -> bool:
    return bool(glob.glob(os.path.join(ckpt_dir, EXPERT_SHARD_GLOB)))


def _by_zero_rank(files: list) -> list:
    # numeric, not lexical: zero_pp_rank_10 comes after zero_pp_rank_9
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1)))


def zero_optim_files(ckpt_dir: str) -> list:
    """DeepSpeed's per-rank optimizer partitions, in data-parallel rank order (empty at ZeRO-0)."""
    return _by_zero_rank(glob.glob(os.path.join(ckpt_dir, ZERO_OPTIM_GLOB)))


def zero_model_files(ckpt_dir: str) -> list:
    return _by_zero_rank(glob.glob(os.path.join(ckpt_dir, ZERO_MODEL_GLOB)))


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder (nothing is created here)."""
    path: str

    @property
    def config(self) -> str:
        return os.path.join(self.path, CONFIG)

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, METRICS)

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, CHECKPOINTS)

    @property
    def wandb(self) -> str:
        return os.path.join(self.path, WANDB)

    @property
    def export(self) -> str:
        return os.path.join(self.path, EXPORT)

    def eval_dir(self, stage: str) -> str:
        return os.path.join(self.path, EVAL, stage)

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.checkpoints, tag_for(step))

    def newest_complete(self) -> Optional[str]:
        return newest_complete(self.checkpoints)


def is_complete(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, MARKER))


def list_complete(ckpt_root: str) -> list[str]:
    """Complete checkpoint folders under RUN_DIR/checkpoints, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    dirs = [os.path.join(ckpt_root, d) for d in sorted(os.listdir(ckpt_root))
            if d.startswith(TAG_PREFIX) and not is_tmp(d)]
    return [d for d in dirs if is_complete(d)]


def newest_complete(ckpt_root: str) -> Optional[str]:
    done = list_complete(ckpt_root)
    return done[-1] if done else None


def resolve_checkpoint(path: str) -> str:
    """A run folder -> its newest complete checkpoint; a checkpoint folder -> itself."""
    if not os.path.isdir(path):
        raise ValueError(f"'{path}' does not exist; pass a run folder or one of its {CHECKPOINTS}/<tag> folders")
    if is_complete(path):
        return path
    if os.path.isfile(os.path.join(path, CLIENT_STATE)):
        raise ValueError(f"checkpoint '{path}' has no {MARKER} marker (its save never finished); "
                         "pass an older checkpoint or the run folder")
    newest = newest_complete(os.path.join(path, CHECKPOINTS))
    if newest is None:
        raise ValueError(f"'{path}' holds no complete checkpoint: pass a run folder with complete checkpoints "
                         f"({CHECKPOINTS}/{TAG_PREFIX}*/{MARKER}) or one of those checkpoint folders")
    return newest
