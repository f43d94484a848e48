"""The one home of the run folder and checkpoint format.

    layout       every file/folder name (RunDir, tag_for, resolve_checkpoint, ...)
    policy       --resume / --overwrite, same-model check, metrics truncation, run_config
    store        collective save/load during training (engine, RNG, loader, expert shards)
    experts      expert-parallel shard files
    consolidate  one fp32 model on CPU from any ZeRO stage / EP size (weights_only=True)
    reshard      resume on another layout: process count, ZeRO stage 0-2, model.moe.ep_size
    stage        a checkpoint's stage -> RoPE + attention on a model

Imports config/, model/ and (lazily) parallel/ and train.schedule; never train.loop,
eval/ or export/, which all build on it.
"""
from moetrain.checkpoint.consolidate import load_model, model_from_state_dict, read_state_dict, zero_state_dict
from moetrain.checkpoint.experts import (expert_shard_path, gather_expert_state_dict, load_expert_shards,
                                         save_expert_shards)
from moetrain.checkpoint.layout import (CLIENT_STATE, MARKER, RunDir, is_complete, list_complete,
                                        newest_complete, resolve_checkpoint, tag_for)
from moetrain.checkpoint.policy import check_same_model, checkpoint_problem, prepare_run_dir, run_config, truncate_metrics
from moetrain.checkpoint.stage import LOADED_BACKEND, apply_stage, final_stage, stage_of, stage_rope
from moetrain.checkpoint.store import CheckpointSaveError, load, prune, read_client_state, save

__all__ = ["CLIENT_STATE", "CheckpointSaveError", "checkpoint_problem", "LOADED_BACKEND", "MARKER", "RunDir", "apply_stage", "check_same_model",
           "expert_shard_path", "final_stage", "gather_expert_state_dict", "is_complete", "list_complete",
           "load", "load_expert_shards", "load_model", "model_from_state_dict", "newest_complete",
           "prepare_run_dir", "prune", "read_client_state", "read_state_dict", "resolve_checkpoint",
           "run_config", "save", "save_expert_shards", "stage_of", "stage_rope", "tag_for", "truncate_metrics",
           "zero_state_dict"]
