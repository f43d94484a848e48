"""Resume policy: what a --resume / --overwrite request means for a run folder,
and which config a path (run folder, checkpoint, HF folder) stands for."""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Optional

from moetrain.checkpoint import layout
from moetrain.checkpoint.store import read_client_state
from moetrain.config import TrainConfig, config_from_dict, load_config, to_dict

# Model fields a resumed run may change: they alter what is computed around the weights
# (or how), never the weights' shapes.
_FREE_ON_RESUME = ("attention", "rope", "activation_checkpointing", "loss_chunk_size", "loss_impl", "init_from")


def prepare_run_dir(run_dir: str, resume: str, overwrite: bool, rank: int) -> Optional[str]:
    """Checks the resume policy and returns the checkpoint to resume from (or None).
    Raises ValueError before anything is written when the request would lose work."""
    run = layout.RunDir(run_dir)
    existing = layout.list_complete(run.checkpoints)
    if resume == "never":
        if existing and not overwrite:
            raise ValueError(f"{run_dir} already holds checkpoints; use --resume auto to continue, "
                             "--overwrite to start over, or another --run-dir")
        if existing and rank == 0:
            shutil.rmtree(run.checkpoints)
            for path in (run.metrics, run.config):
                if os.path.exists(path):
                    os.remove(path)
        return None
    if resume == "auto":
        return _newest_loadable(existing, rank)
    if not (os.path.isdir(resume) and layout.is_complete(resume)):
        raise ValueError(f"--resume {resume} is not a complete checkpoint folder (no {layout.MARKER} marker); "
                         f"give {layout.CHECKPOINTS}/<tag> of a run, or --resume auto")
    problem = checkpoint_problem(resume)
    if problem:
        raise ValueError(f"--resume {resume} cannot be loaded: {problem}; pass an older checkpoint")
    return resume


def _newest_loadable(complete: list, rank: int) -> Optional[str]:
    """The newest complete checkpoint that loads; a broken one is skipped with one line.
    A hostile one (pickled code) is refused outright: ValueError, nothing falls back."""
    for i in range(len(complete) - 1, -1, -1):
        problem = checkpoint_problem(complete[i])
        if not problem:
            return complete[i]
        if rank == 0:
            older = f"falling back to {complete[i - 1]}" if i else "no older one left: starting from scratch"
            print(f"warning: checkpoint {complete[i]} is unreadable ({problem}); {older}", file=sys.stderr)
    return None


def checkpoint_problem(ckpt_dir: str) -> Optional[str]:
    """Why a complete checkpoint cannot be resumed (a missing, truncated or unparsable
    file), or None. Every .pt is opened with torch.load(weights_only=True) (mmap: only
    the pickled part is read), so a file holding pickled code raises ValueError here,
    before DeepSpeed (which unpickles fully) ever sees it."""
    from moetrain.checkpoint.consolidate import _ds_records, _load
    try:
        client = read_client_state(ckpt_dir)
        world = int(client["world_size"])
        client["step"], client["config"]["model"]  # noqa: B018 - present, or the resume cannot work
        for r in range(world):
            with open(layout.rank_state_path(ckpt_dir, r)) as f:
                json.load(f)["rng"]  # noqa: B018
            if not os.path.isfile(layout.torch_rng_path(ckpt_dir, r)):
                return f"{os.path.basename(layout.torch_rng_path(ckpt_dir, r))} is missing"
        names = os.listdir(ckpt_dir)
        if layout.DS_MODEL_FILE not in names and not layout.zero_model_files(ckpt_dir):
            return f"no DeepSpeed model file ({layout.DS_MODEL_FILE} or {layout.ZERO_MODEL_GLOB})"
        records = _ds_records()
        for name in sorted(n for n in names if n.endswith(".pt")):
            _load(os.path.join(ckpt_dir, name), records, mmap=True)
    except ValueError as e:
        if "refusing to load" in str(e):
            raise
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    except (OSError, KeyError, TypeError, RuntimeError, EOFError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def check_same_model(cfg: TrainConfig, ckpt_dir: str) -> None:
    saved = dict(read_client_state(ckpt_dir)["config"]["model"])
    now = to_dict(cfg.model)
    # model.moe.ep_size only decides where the experts live: a resume re-splits them (reshard.py)
    now["moe"] = {k: v for k, v in now["moe"].items() if k != "ep_size"}
    saved["moe"] = {k: v for k, v in (saved.get("moe") or {}).items() if k != "ep_size"}
    diff = [k for k in now if k not in _FREE_ON_RESUME and now[k] != saved.get(k)]
    if diff:
        raise ValueError(f"checkpoint {ckpt_dir} has a different model.{diff[0]} ({saved.get(diff[0])!r} vs "
                         f"{now[diff[0]]!r}); use the run's {layout.CONFIG} or a new --run-dir")


def truncate_metrics(path: str, step: int) -> None:
    """Drop records past the resumed step (they were written by the killed run
    and are about to be recomputed), so metrics.jsonl stays one line per step."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def run_config(path: str, overrides=()) -> Optional[TrainConfig]:
    """The config a path was trained with, plus dotted `overrides`: a run folder's config.yaml
    (validated, as load_config does), one checkpoint's client_state config; None for a
    Hugging Face folder (config.json) or a folder that is neither."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    run_yaml = layout.RunDir(path).config
    if os.path.isfile(run_yaml):
        return load_config(run_yaml, overrides)
    if os.path.isfile(os.path.join(path, layout.CLIENT_STATE)):
        return config_from_dict(read_client_state(path)["config"], overrides)
    return None
