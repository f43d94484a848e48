"""Resuming on another layout: a checkpoint written by N processes (ZeRO stage z,
model.moe.ep_size e) loaded by M processes (stage z', ep_size e').

DeepSpeed refuses to load ZeRO optimizer partitions at another data-parallel size,
and its universal-checkpoint converter (ds_to_universal) unpickles every file fully.
So we re-split ourselves, with the same weights_only reader as consolidate.py:

  read   every parameter's fp32 master and optimizer state (Adam's exp_avg /
         exp_avg_sq / step, Muon's momentum) as whole tensors, keyed by name:
         ZeRO-1/2 flat partitions are cut as consolidate cuts the fp32 masters;
         ZeRO-0 states come from DeepSpeed's optimizer file(s) (one per EP rank)
  write  this rank's share into the freshly built engine: module weights, and at
         ZeRO-1/2 the fp32 partition and optimizer state through DeepSpeed's own
         fragment mapping (param._hp_mapping); expert tensors are cut to this EP
         rank's experts [r*E/P, (r+1)*E/P)

Supported: ZeRO 0 (fp32), 1 and 2 on either side, any EP size. ZeRO-3 and bf16 at
ZeRO-0 (DeepSpeed's BF16_Optimizer) refuse with one line naming both layouts.
Per-rank state: the data position is global (loader.py), so every new rank takes
rank 0's; RNG streams of ranks that existed are kept, a new rank's are derived from
(seed, step, rank). The trainer's own state and callback state are world-independent.
"""
from __future__ import annotations

import json
import os
import random
from typing import Optional

import numpy as np
import torch

from moetrain.checkpoint import layout

# consolidate.py (the weights_only reader) imports store.py, which imports this module: imported lazily
OPTIM_NAMES = "optimizer_param_names"  # client_state key: names of every optimizer group's params, in order


def saved_layout(client: dict) -> dict:
    cfg = client["config"]
    moe = cfg["model"].get("moe", {})
    return {"world": int(client["world_size"]), "zero": int(cfg["deepspeed"]["zero_stage"]),
            "ep": int(moe.get("ep_size", 1)) if moe.get("n_experts") else 1}


def current_layout(engine, world: int, ep_groups) -> dict:
    return {"world": world, "zero": int(engine.zero_optimization_stage()),
            "ep": ep_groups.ep_size if ep_groups is not None else 1}


def describe(lay: dict) -> str:
    return f"{lay['world']} process{'es' if lay['world'] != 1 else ''} (ZeRO-{lay['zero']}, ep_size {lay['ep']})"


def optimizer_param_names(engine) -> list[list[str]]:
    """Names of the params of each optimizer group, in group order (saved with every checkpoint:
    at ZeRO-0 DeepSpeed's optimizer file keys its state by position only)."""
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    groups = opt.bit16_groups if hasattr(opt, "bit16_groups") else [g["params"] for g in opt.param_groups]
    return [[name_of[id(p)] for p in g if id(p) in name_of] for g in groups]


# --------------------------------------------------------------------------- reading
def _zero12_optimizer_state(ckpt_dir: str) -> dict:
    """{name: {key: whole tensor | scalar}} from ZeRO-1/2 (or bf16) flat partitions."""
    from moetrain.checkpoint.consolidate import _ds_records, _load, _zero12_state_dict
    records = _ds_records()
    opt = [_load(f, records)["optimizer_state_dict"] for f in layout.zero_optim_files(ckpt_dir)]
    model_file = _load(os.path.join(ckpt_dir, layout.DS_MODEL_FILE), records)
    base = [o["base_optimizer_state"] for o in opt]
    if not all(isinstance(b, dict) and "state" in b for b in base):
        raise ValueError(f"{ckpt_dir}: DeepSpeed's optimizer files are in the elastic format; resume with the "
                         "process count that wrote them")
    groups = model_file["param_shapes"]
    # per group: its state keys (AdamW's moments, Muon's momentum: groups may differ)
    group_keys = [sorted(k for k, v in base[0]["state"].get(g, {}).items() if torch.is_tensor(v) and v.dim() == 1)
                  for g in range(len(groups))]
    out = {name: {} for shapes in groups for name in shapes}
    for key in sorted({k for keys in group_keys for k in keys}):
        def flat(o, b, g):  # one rank's flat state minus its group padding (zeros where the group lacks `key`)
            n = o["single_partition_of_fp32_groups"][g].numel()
            return b["state"][g][key][:n] if key in group_keys[g] else torch.zeros(n)
        parts = [{**o, "single_partition_of_fp32_groups": [flat(o, b, g) for g in range(len(groups))]}
                 for o, b in zip(opt, base)]
        full = _zero12_state_dict(model_file, parts)
        for g, shapes in enumerate(groups):
            for name in shapes:
                if key in group_keys[g]:
                    out[name][key] = full[name]
    for g, shapes in enumerate(groups):
        for name in shapes:
            out[name].update({k: v for k, v in base[0]["state"].get(g, {}).items()
                              if not (torch.is_tensor(v) and v.dim())})
    return out


def _zero0_optimizer_state(ckpt_dir: str, names: Optional[list]) -> dict:
    """{name: {key: whole tensor | scalar}} from DeepSpeed's ZeRO-0 optimizer file(s): the
    model file's (rank 0), or under EP one expp_rank_{r} file per EP rank whose expert
    states are that rank's slices (concatenated here in EP-rank order)."""
    from moetrain.checkpoint.consolidate import _ds_records, _load
    records = _ds_records()
    ep_files = sorted((f for f in os.listdir(ckpt_dir) if f.startswith("expp_rank_") and f.endswith("optim_states.pt")),
                      key=lambda f: int(f.split("_")[2]))  # expp_rank_{r}_mp_rank_00_optim_states.pt
    if ep_files:
        states = [_load(os.path.join(ckpt_dir, f), records)["optimizer"] for f in ep_files]
    else:
        states = [_load(os.path.join(ckpt_dir, layout.DS_MODEL_FILE), records)["optimizer"]]
    if names is None or [len(n) for n in names] != [len(g["params"]) for g in states[0]["param_groups"]]:
        raise ValueError(f"{ckpt_dir} does not name its ZeRO-0 optimizer state ({OPTIM_NAMES} missing or "
                         "stale in client_state.json)")
    expert = set()
    if ep_files:
        expert = set(torch.load(layout.expert_shard_path(ckpt_dir, 0), map_location="cpu",
                                weights_only=True)["tensors"])
    out = {}
    for group_names, group in zip(names, states[0]["param_groups"]):
        for name, idx in zip(group_names, group["params"]):
            per_rank = [s["state"].get(idx, {}) for s in states]
            out[name] = {k: (torch.cat([st[k] for st in per_rank]) if name in expert and torch.is_tensor(v)
                             and v.dim() else v) for k, v in per_rank[0].items()}
    return out


def read_full_state(ckpt_dir: str, client: dict, names: Optional[list]) -> tuple[dict, dict]:
    """(whole fp32 weights by name, whole optimizer state by name) of a ZeRO 0-2 checkpoint."""
    from moetrain.checkpoint.consolidate import read_state_dict
    weights, _ = read_state_dict(ckpt_dir)
    if layout.zero_optim_files(ckpt_dir):
        state = _zero12_optimizer_state(ckpt_dir)
    else:
        state = _zero0_optimizer_state(ckpt_dir, client.get(OPTIM_NAMES) or names)
    return weights, state


# --------------------------------------------------------------------------- writing
def _local(name: str, t, param, ep_groups):
    """This rank's part of a whole tensor: expert tensors are cut to this EP rank's experts."""
    from moetrain.parallel.expert_parallel import is_expert_param
    if not torch.is_tensor(t) or t.dim() == 0:
        return t
    if ep_groups is not None and is_expert_param(param):
        n = param.shape[0]
        t = t[ep_groups.ep_rank * n:(ep_groups.ep_rank + 1) * n]
    if tuple(t.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, this run's parameter "
                         f"{tuple(param.shape)}; the checkpoint is from another model")
    return t


@torch.no_grad()
def _write_torch_optimizer(opt, params: dict, state: dict, ep_groups) -> None:
    """ZeRO-0 in fp32: the client optimizer itself, state per parameter."""
    name_of = {id(p): n for n, p in params.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = name_of[id(p)]
            opt.state[p] = {k: (_local(name, v, p, ep_groups).to(p.device).clone() if torch.is_tensor(v) else v)
                            for k, v in state[name].items()}


@torch.no_grad()
def _write_zero12(opt, params: dict, weights: dict, state: dict, ep_groups) -> None:
    """ZeRO-1/2: fresh flat state buffers per group, filled through DeepSpeed's fragment
    mapping (each parameter's slice of this rank's partition; padding stays zero)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
    name_of = {id(p): n for n, p in params.items()}
    device = opt.single_partition_of_fp32_groups[0].device
    for i, hp in enumerate(opt.single_partition_of_fp32_groups):
        first = state[name_of[id(opt.bit16_groups[i][0])]]
        opt.optimizer.state[hp] = {k: (torch.zeros_like(hp) if torch.is_tensor(v) and v.dim() else
                                       (v.clone() if torch.is_tensor(v) else v)) for k, v in first.items()}
        lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], hp, opt.optimizer.state)
    opt._hp_optimizer_states_linked = True
    for group in opt.bit16_groups:
        for p in group:
            name = name_of[id(p)]
            safe_set_full_fp32_param(p, _local(name, weights[name], p, ep_groups).to(device, torch.float32))
            for k, v in state[name].items():
                if torch.is_tensor(v) and v.dim():
                    safe_set_full_optimizer_state(p, _local(name, v, p, ep_groups).to(device, torch.float32), k)


def _check_writable(engine, old: dict, new: dict, ckpt_dir: str, old_bf16: bool = False) -> None:
    """Refuse (one line, both layouts, the fix) what is not re-split: ZeRO-3 on either side, and
    bf16 at ZeRO-0 (DeepSpeed's BF16_Optimizer keeps its own partitions) on either side."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    opt = engine.optimizer
    ok_new = isinstance(opt, DeepSpeedZeroOptimizer) or (new["zero"] == 0 and isinstance(opt, torch.optim.Optimizer)
                                                         and not hasattr(opt, "bf16_groups"))
    if old["zero"] == 3 or (old["zero"] == 0 and old_bf16) or not ok_new:
        raise ValueError(f"checkpoint {ckpt_dir} was written by {describe(old)}, this launch has {describe(new)}: "
                         "re-splitting works between ZeRO 0 (fp32), 1 and 2 only; relaunch with the checkpoint's "
                         f"layout: {old['world']} process(es), deepspeed.zero_stage={old['zero']}, "
                         f"model.moe.ep_size={old['ep']}")


def load_resharded(engine, ckpt_dir: str, client: dict, world: int, ep_groups) -> None:
    """Collective in effect (every rank reads the whole checkpoint, no communication): the
    engine's weights and optimizer state from a checkpoint of another layout."""
    from moetrain.checkpoint.consolidate import _ds_records, _load
    old, new = saved_layout(client), current_layout(engine, world, ep_groups)
    _check_writable(engine, old, new, ckpt_dir, client["config"].get("train", {}).get("precision") == "bf16")
    same_groups = old["ep"] == new["ep"]  # ZeRO-0 state without saved names: positions match the current groups
    weights, state = read_full_state(ckpt_dir, client, optimizer_param_names(engine) if same_groups else None)
    params = dict(engine.module.named_parameters())
    missing = [n for n in params if n not in weights or n not in state]
    if missing:
        raise ValueError(f"checkpoint {ckpt_dir} has no weights or optimizer state for {missing[0]}; "
                         "it is from another model")
    with torch.no_grad():
        for name, p in params.items():
            p.data.copy_(_local(name, weights[name], p, ep_groups).to(p.device, p.dtype))
    if hasattr(engine.optimizer, "single_partition_of_fp32_groups"):
        _write_zero12(engine.optimizer, params, weights, state, ep_groups)
    else:
        _write_torch_optimizer(engine.optimizer, params, state, ep_groups)
    model_file = _load(os.path.join(ckpt_dir, layout.DS_MODEL_FILE), _ds_records(), mmap=True)
    engine.global_steps = int(model_file.get("global_steps", engine.global_steps))
    engine.global_samples = int(model_file.get("global_samples", engine.global_samples))
    engine.skipped_steps = int(model_file.get("skipped_steps", engine.skipped_steps))


def rank_state(ckpt_dir: str, client: dict, rank: int) -> tuple[dict, object]:
    """(this rank's rank{r}.json, its torch RNG state) at another world size: the loader
    position is global (the same in every rank's file), so a new rank takes rank 0's; a rank
    that existed keeps its RNG streams, a new one gets streams derived from (seed, step, rank)."""
    src = rank if rank < int(client["world_size"]) else 0
    with open(layout.rank_state_path(ckpt_dir, src)) as f:
        state = json.load(f)
    torch_rng = torch.load(layout.torch_rng_path(ckpt_dir, src), map_location="cpu", weights_only=True)
    if src != rank:
        seed = int(np.random.SeedSequence([int(client["config"].get("seed", 0)), int(client["step"]), rank])
                   .generate_state(1)[0])
        gen, rs = random.Random(seed), np.random.RandomState(seed)
        np_state = rs.get_state()
        state["rng"] = {"python": [list(x) if isinstance(x, tuple) else x for x in gen.getstate()],
                        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        torch_rng = torch.Generator().manual_seed(seed).get_state()
    return state, torch_rng


def global_batch_note(client: dict, cfg, dp: int) -> Optional[str]:
    """A warning line when the resumed global batch (sequences per optimizer step, at `dp`
    data-parallel ranks) differs from the checkpoint's, or None."""
    from moetrain.config import config_from_dict
    from moetrain.train.schedule import plan_stages
    old_cfg = config_from_dict(client["config"])
    old_dp = max(1, int(client["world_size"]) // old_cfg.deepspeed.sequence_parallel_size)
    idx = int(client.get("stage", 0))
    old_plans, new_plans = plan_stages(old_cfg, old_dp), plan_stages(cfg, dp)
    if idx >= min(len(old_plans), len(new_plans)):
        return None
    o, n = old_plans[idx], new_plans[idx]
    gb_old, gb_new = o.micro_batch_size * o.grad_accum_steps * old_dp, n.micro_batch_size * n.grad_accum_steps * dp
    if gb_old == gb_new:
        return None
    return (f"warning: resuming a checkpoint of {old_dp} data-parallel ranks with {dp} changes the global batch "
            f"from {gb_old} to {gb_new} sequences per step; set train.global_batch_size={gb_old} (and drop "
            "train.grad_accum_steps) to keep the optimisation")
