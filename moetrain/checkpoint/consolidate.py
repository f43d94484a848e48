"""One full fp32 model on CPU from a checkpoint of any ZeRO stage and EP size,
without the training world and without running anybody's pickles.

ZeRO-0: the module is in mp_rank_00_model_states.pt (rank 0's expert slices; the
other EP ranks' are in experts_ep*.pt). ZeRO 1-3 (and bf16 at stage 0): the fp32
master weights are partitioned over *zero_pp_rank_*_optim_states.pt; we merge them
ourselves, as deepspeed/utils/zero_to_fp32.py does, because zero_to_fp32 fully unpickles
those files (any code a sent checkpoint carries would run). Every torch.load here is
weights_only=True; the optimizer files need three plain DeepSpeed records allowlisted
(_ds_records).
"""
from __future__ import annotations

import math
import os
import pickle
import re

import torch

from moetrain.checkpoint import layout
from moetrain.checkpoint.experts import gather_expert_state_dict
from moetrain.checkpoint.stage import LOADED_BACKEND, apply_stage, stage_of
from moetrain.checkpoint.store import read_client_state
from moetrain.config import TrainConfig, config_from_dict


def _ds_records() -> list:
    """The only non-tensor classes DeepSpeed pickles into its optimizer files. Each is
    rebuilt without running its code: LossScaler via object.__new__ + __dict__ (no
    __setstate__/__reduce__), fragment_address is a @dataclass of two ints, and
    ZeroStageEnum(3) is an int-Enum lookup."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def _load(path: str, records=(), mmap: bool = False) -> dict:
    try:
        with torch.serialization.safe_globals(list(records)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is a page long; keep the line that names the refused global
        found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|$)", str(e), re.M)
        reason = found.group(1) if found else type(e).__name__
        raise ValueError(f"refusing to load {path}: it holds pickled objects other than tensors and "
                         f"DeepSpeed's plain records ({reason}); is it a checkpoint from a source you trust?") from None


def _load_partitions(files: list) -> list:
    """optimizer_state_dict of every rank; mmap so that the Adam moments are never read."""
    records = _ds_records()
    out = []
    for f in files:
        opt = _load(f, records, mmap=True)["optimizer_state_dict"]
        for moments in ("optimizer_state_dict", "base_optimizer_state"):
            opt.pop(moments, None)
        out.append(opt)
    return out


def _module_state_dict(ckpt_dir: str) -> dict:
    """ZeRO-0 (and the EP model file): the full module as DeepSpeed saved it."""
    path = os.path.join(ckpt_dir, layout.DS_MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"'{ckpt_dir}' has no {layout.DS_MODEL_FILE}; it is not a DeepSpeed checkpoint")
    return _load(path)["module"]


def _buffers_and_frozen(model_files: list, partitioned: bool) -> dict:
    """Buffers (rank 0 has them whole) and the parameters no optimizer owns (frozen or
    empty ones): whole in the module file at ZeRO 1/2, partitioned like the rest at ZeRO-3."""
    first = model_files[0]
    sd = {k: v for k, v in first["module"].items() if k in first["buffer_names"]}
    for name, shape in (first.get("frozen_param_shapes") or {}).items():
        if partitioned:
            frags = torch.cat([m["frozen_param_fragments"][name] for m in model_files])
            sd[name] = frags.narrow(0, 0, math.prod(shape)).view(tuple(shape))
        else:
            sd[name] = first["frozen_param_fragments"][name]
    return sd


def _walk_flat(flat: torch.Tensor, shapes: dict, paddings) -> dict:
    """Cut one merged fp32 group into its parameters (the order DeepSpeed flattened them)."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    need = sum(sizes) + (sum(paddings) if paddings is not None else 0)
    if need > flat.numel():
        raise ValueError(f"ZeRO partitions hold {flat.numel()} values but the parameters need {need}; "
                         "the checkpoint is incomplete or from another model")
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        out[name] = flat.narrow(0, offset, sizes[i]).view(tuple(shape)).clone()
        offset += sizes[i] + (paddings[i] if paddings is not None else 0)
    return out


def _zero12_state_dict(model_file: dict, opt: list) -> dict:
    """ZeRO-1/2 (also bf16 at stage 0): group g is cut into partition_count[g] equal parts.
    Plain groups span the whole world (P = 1); expert groups are partitioned over the
    expert-data-parallel replicas of each EP rank r (ranks r, r+P, ...; P = ep_size), and
    EP rank r's part of every stacked expert tensor is its experts [r*E/P, (r+1)*E/P)."""
    world, counts = len(opt), opt[0]["partition_count"]
    shapes_per_group = model_file["param_shapes"]
    counts = counts if isinstance(counts, list) else [counts] * len(shapes_per_group)
    if max(counts) != world or any(world % c for c in counts):
        raise ValueError(f"the checkpoint's optimizer is partitioned {max(counts)} ways but {world} "
                         f"*zero_pp_rank_* files are there; a rank's save is missing or left over")
    paddings = opt[0].get("param_alignment_paddings") or [None] * len(counts)
    sd = _buffers_and_frozen([model_file], partitioned=False)
    for g, shapes in enumerate(shapes_per_group):
        P = world // counts[g]
        parts = [_walk_flat(torch.cat([opt[j]["single_partition_of_fp32_groups"][g] for j in range(r, world, P)]),
                            shapes, paddings[g]) for r in range(P)]
        for name in shapes:
            sd[name] = torch.cat([p[name] for p in parts]) if P > 1 else parts[0][name]
    return sd


def _zero3_state_dict(model_files: list, opt: list) -> dict:
    """ZeRO-3: every parameter is padded to a multiple of the world size and split evenly;
    rank r keeps part r of each, back to back over its groups (zero_to_fp32's arithmetic)."""
    world = opt[0]["partition_count"]
    if world != len(opt) or len(model_files) != world:
        raise ValueError(f"a ZeRO-3 checkpoint of {world} ranks needs {world} optimizer and model files, found "
                         f"{len(opt)} and {len(model_files)}; a rank's save is missing or left over")
    flat = [torch.cat(list(o["fp32_flat_groups"])) for o in opt]
    sd = _buffers_and_frozen(model_files, partitioned=True)
    offset = 0
    for group in model_files[0]["param_shapes"]:
        for name, shape in group.items():
            n = math.prod(shape)
            part = math.ceil(n / world)
            if offset + part > flat[0].numel():
                raise ValueError("ZeRO-3 partitions are shorter than the parameters need; the checkpoint "
                                 "is incomplete or from another model")
            sd[name] = torch.cat([f.narrow(0, offset, part) for f in flat]).narrow(0, 0, n).view(tuple(shape))
            offset += part
    if offset != flat[0].numel():
        raise ValueError(f"consumed {offset} of {flat[0].numel()} values per ZeRO-3 partition; the checkpoint "
                         "is from another model")
    return sd


def zero_state_dict(ckpt_dir: str) -> dict:
    """The merged fp32 master weights (+ buffers) of a ZeRO 1-3 checkpoint of any world and EP size."""
    opt = _load_partitions(layout.zero_optim_files(ckpt_dir))
    if not opt:
        raise ValueError(f"'{ckpt_dir}' has no {layout.ZERO_OPTIM_GLOB} files")
    if "fp32_flat_groups" in opt[0]:
        model_files = [_load(f) for f in layout.zero_model_files(ckpt_dir)]
        sd, first = _zero3_state_dict(model_files, opt), model_files[0]
    elif "single_partition_of_fp32_groups" in opt[0]:
        first = _load(os.path.join(ckpt_dir, layout.DS_MODEL_FILE))
        sd = _zero12_state_dict(first, opt)
    else:
        raise ValueError(f"'{ckpt_dir}': unknown DeepSpeed optimizer partition format (keys {sorted(opt[0])[:6]})")
    for alias, source in (first.get("shared_params") or {}).items():
        if source in sd:
            sd[alias] = sd[source]
    return sd


def read_state_dict(ckpt_dir: str) -> tuple[dict, TrainConfig]:
    """(full fp32 state dict, the run's resolved TrainConfig) of one complete checkpoint."""
    cfg = config_from_dict(read_client_state(ckpt_dir)["config"])
    # Not DeepSpeed-MoE's expp_rank_* files: at ZeRO-0 they hold plain optimizer state, no weights.
    if layout.zero_optim_files(ckpt_dir):
        sd = zero_state_dict(ckpt_dir)
    else:  # ZeRO-0: the module file has rank 0's expert slices, experts_ep*.pt the rest
        sd = gather_expert_state_dict(_module_state_dict(ckpt_dir), ckpt_dir)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, cfg


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
    checkpoint, any ZeRO stage or EP size -> one fp32 model on CPU in eval mode, with
    the RoPE and attention of the last stage that ran (backend LOADED_BACKEND)."""
    ckpt_dir = layout.resolve_checkpoint(path)
    sd, cfg = read_state_dict(ckpt_dir)
    model = model_from_state_dict(cfg.model, sd)
    apply_stage(model, stage_of(cfg, read_client_state(ckpt_dir)), backend=LOADED_BACKEND)
    return model
