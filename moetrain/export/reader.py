"""Read our DeepSpeed checkpoints back into one full fp32 model on CPU.

Works without the training world size: ZeRO 1/2/3 partitions are merged by
DeepSpeed's own zero_to_fp32 (fp32 master weights), ZeRO-0 checkpoints hold the
full module in mp_rank_00_model_states.pt, and expert-parallel shards
(experts_ep*.pt) are concatenated back into full stacked expert tensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import math
import os
import re

import torch

from moetrain.config import AttentionConfig, RopeConfig, TrainConfig, config_from_dict
from moetrain.train import checkpoint as ckpt


def resolve_checkpoint(path: str) -> str:
    """A run folder -> its newest complete checkpoint; a checkpoint folder -> itself."""
    if not os.path.isdir(path):
        raise ValueError(f"'{path}' does not exist; pass a run folder or one of its checkpoints/<tag> folders")
    if ckpt.is_complete(path):
        return path
    if os.path.isfile(os.path.join(path, "client_state.json")):
        raise ValueError(f"checkpoint '{path}' has no {ckpt.MARKER} marker (its save never finished); "
                         "pass an older checkpoint or the run folder")
    newest = ckpt.newest_complete(os.path.join(path, "checkpoints"))
    if newest is None:
        raise ValueError(f"'{path}' is neither a complete checkpoint nor a run folder with complete checkpoints "
                         "(expected checkpoints/step_*/COMPLETE)")
    return newest


def _module_state_dict(ckpt_dir: str) -> dict:
    """ZeRO-0 (and the EP model file): the full module as DeepSpeed saved it."""
    path = os.path.join(ckpt_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise ValueError(f"'{ckpt_dir}' has no mp_rank_00_model_states.pt; it is not a DeepSpeed checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def _zero_fp32_state_dict(ckpt_dir: str) -> dict:
    """ZeRO 1/2/3: DeepSpeed's zero_to_fp32 merges the fp32 master partitions of any
    world size. Note: it unpickles the optimizer files with weights_only=False
    (they hold DeepSpeed objects), so only export checkpoints you trust; every
    other file here is read with weights_only=True."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(os.path.normpath(ckpt_dir))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines to stdout
        return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)


def _has_expert_shards(ckpt_dir: str) -> bool:
    return bool(glob.glob(os.path.join(ckpt_dir, "experts_ep*.pt")))


def _walk_flat(flat: torch.Tensor, shapes: dict, paddings) -> dict:
    """Cut one merged fp32 group into its parameters (the order DeepSpeed flattened them)."""
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        out[name] = flat.narrow(0, offset, n).view(tuple(shape)).clone()
        offset += n + (paddings[i] if paddings is not None else 0)
    if offset > flat.numel():
        raise ValueError(f"ZeRO partitions hold {flat.numel()} values but the parameters need {offset}; "
                         "the checkpoint is incomplete or from another model")
    return out


def _zero12_ep_state_dict(ckpt_dir: str) -> dict:
    """ZeRO-1/2 with expert parallelism, which zero_to_fp32 cannot merge: expert groups
    are partitioned over the expert-data-parallel replicas of each EP rank (ranks
    r, r+P, ...; partition_count = world/P), all other groups over the whole world.
    Same weights_only=False caveat as _zero_fp32_state_dict (DeepSpeed objects inside)."""
    model_file = torch.load(os.path.join(ckpt_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=True)
    files = sorted(glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_optim_states.pt")),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f).group(1)))
    opt = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    world, counts = len(opt), opt[0]["partition_count"]
    paddings = opt[0].get("param_alignment_paddings") or [None] * len(counts)
    sd = {k: v for k, v in model_file["module"].items() if k in model_file["buffer_names"]}
    for g, shapes in enumerate(model_file["param_shapes"]):
        P = world // counts[g]  # 1 for replicated groups, ep_size for expert groups
        parts = [_walk_flat(torch.cat([opt[j]["single_partition_of_fp32_groups"][g] for j in range(r, world, P)]),
                            shapes, paddings[g]) for r in range(P)]
        for name in shapes:
            sd[name] = torch.cat([p[name] for p in parts]) if P > 1 else parts[0][name]
    for alias, source in model_file["shared_params"].items():
        sd[alias] = sd[source]
    return sd


def gather_experts(state_dict: dict, ckpt_dir: str) -> dict:
    """Expert parallelism: replace every stacked expert slice by the full tensor
    (EP rank r holds experts [r*E/P, (r+1)*E/P)). A no-op for EP size 1."""
    from moetrain.parallel.expert_parallel import gather_expert_state_dict
    return gather_expert_state_dict(state_dict, ckpt_dir)


def read_state_dict(ckpt_dir: str) -> tuple[dict, TrainConfig]:
    """(full fp32 state dict, the run's resolved TrainConfig) of one complete checkpoint."""
    client = ckpt.read_client_state(ckpt_dir)
    cfg = config_from_dict(client["config"])
    # ZeRO 1-3 (and bf16 at stage 0 on GPU) keep fp32 masters in *zero_pp_rank_* optimizer partitions.
    # Not DeepSpeed-MoE's expp_rank_* files: plain optimizer state, which zero_to_fp32 rejects.
    zero_files = glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_optim_states.pt"))
    if zero_files and _has_expert_shards(ckpt_dir):
        sd = _zero12_ep_state_dict(ckpt_dir)
    elif zero_files:
        sd = _zero_fp32_state_dict(ckpt_dir)
    else:  # ZeRO-0: the module file has rank 0's expert slices, experts_ep*.pt the rest
        sd = gather_experts(_module_state_dict(ckpt_dir), ckpt_dir)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, cfg


def final_stage(cfg: TrainConfig, client: dict) -> tuple[RopeConfig, int, AttentionConfig]:
    """(RoPE, its context, attention pattern) of the last stage that ran, exactly as
    the trainer's enter_stage set them."""
    from moetrain.train.schedule import plan_stages
    plans = plan_stages(cfg, client.get("world_size", 1))
    idx = min(int(client.get("stage", len(plans) - 1)), len(plans) - 1)
    if client.get("step_in_stage") == 0 and idx > 0:
        idx -= 1  # saved right at a stage boundary: the next stage has not run a single step yet
    plan = plans[idx]
    rope = dataclasses.replace(plan.rope, original_max_position_embeddings=plan.original_max_position_embeddings)
    return rope, plan.seq_len, plan.attention


def model_from_state_dict(mcfg, sd: dict):
    """Our model around the tensors of `sd` (no copy: built on the meta device, then the
    weights are assigned), fp32, CPU, eval mode."""
    from moetrain.model import build_model
    with torch.device("meta"):
        model = build_model(mcfg)
    model.rotary.to_empty(device="cpu")  # its non-persistent frequencies are recomputed on CPU
    _load_weights(model, {k: v.float().contiguous() for k, v in sd.items()})
    if mcfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    assert not any(t.is_meta for t in model.state_dict().values())
    return model.eval()


def build_trained_model(sd: dict, cfg: TrainConfig, client: dict):
    """Our model with the checkpoint's weights and the final stage's RoPE/attention, fp32, CPU, eval."""
    model = model_from_state_dict(cfg.model, sd)
    rope, seq_len, attn = final_stage(cfg, client)
    model.set_rope(rope, seq_len)
    model.set_attention(dataclasses.replace(attn, backend="auto"))  # the CUDA-only triton backend must not stick
    return model


def _load_weights(model, sd: dict) -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model in its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    bad = [k for k in want if tuple(want[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise ValueError(f"checkpoint tensor {bad[0]} has shape {tuple(sd[bad[0]].shape)} but the model expects "
                         f"{tuple(want[bad[0]].shape)} (an expert-parallel checkpoint without its experts_ep*.pt?)")
    model.load_state_dict(sd, strict=True, assign=True)


def load_model(path: str):
    """DESIGN's moetrain.load_model: a run folder (newest complete checkpoint) or one
    checkpoint, any ZeRO stage or EP size -> one fp32 model on CPU in eval mode."""
    ckpt_dir = resolve_checkpoint(path)
    sd, cfg = read_state_dict(ckpt_dir)
    return build_trained_model(sd, cfg, ckpt.read_client_state(ckpt_dir))
