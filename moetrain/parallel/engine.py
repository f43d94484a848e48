"""Process-group setup and the DeepSpeed engine, derived from our config.

Works under `deepspeed`, `torchrun`, `accelerate launch` (they all export
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*) and plain `python` (one process: we fill
in the rendezvous variables ourselves).
"""
from __future__ import annotations

import copy
import os
import socket

import torch

from moetrain.config import TrainConfig, grad_accum_for
from moetrain.optim import MoonlightMuon, muon_param_groups
from moetrain.optim.muon_zero import attach_zero_layouts
from moetrain.parallel.expert_parallel import moe_param_groups
from moetrain.parallel.parallelize import Parallelism


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(local_rank: int | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world, local_rank)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launched = "WORLD_SIZE" in os.environ
    if local_rank is not None and local_rank >= 0:
        os.environ["LOCAL_RANK"] = str(local_rank)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        if launched:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        else:
            # One process, no launcher: a private TCP rendezvous instead of env://,
            # so that processes we start later don't inherit a rendezvous port
            # (DeepSpeed itself only insists on LOCAL_RANK).
            os.environ.setdefault("LOCAL_RANK", "0")
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                       init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    _share_cpu_threads()
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def _share_cpu_threads() -> None:
    """CPU runs with several processes per machine: split the cores between them.
    Without this every rank starts one OpenMP thread per core and a 2-core machine
    running 2 ranks slows down many times over. An explicit OMP_NUM_THREADS wins."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if torch.cuda.is_available() or local <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // local))


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def derive_deepspeed_config(cfg: TrainConfig, dp_world: int, micro_batch_size: int | None = None,
                            grad_accum_steps: int | None = None) -> dict:
    """The DeepSpeed JSON, derived from our config; `deepspeed.extra` merged last."""
    d, t = cfg.deepspeed, cfg.train
    mbs = micro_batch_size or t.micro_batch_size
    ga = grad_accum_steps or grad_accum_for(t, max(1, dp_world // d.sequence_parallel_size))
    zero = {
        "stage": d.zero_stage,
        "overlap_comm": d.overlap_comm and d.zero_stage > 0,
        "contiguous_gradients": True,
        "reduce_bucket_size": d.reduce_bucket_size,
        "allgather_bucket_size": d.reduce_bucket_size,
    }
    if d.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=d.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=10_000,
                    stage3_gather_16bit_weights_on_model_save=False)
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": d.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if d.offload_param != "none":
        zero["offload_param"] = {"device": d.offload_param, "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": ga,
        "train_batch_size": mbs * ga * dp_world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        # Our optimizer is built from the config (AdamW param groups / Muon).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, d.extra)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices only (norms, embeddings excluded)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return moe_param_groups(groups)  # MoE (issue 3): expert-parallel params in DeepSpeed MoE groups


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The client optimizer handed to DeepSpeed: AdamW, or Muon (Moonlight recipe,
    moetrain.optim) with AdamW for the non-matrix parameters in the same optimizer."""
    o = cfg.optim
    if o.name == "muon":
        # Expert params are this rank's own experts (EP): orthogonalising them locally is
        # exact, each expert being a separate matrix.
        return MoonlightMuon(moe_param_groups(muon_param_groups(model, o.weight_decay)), lr=o.lr,
                             betas=tuple(o.betas), eps=o.eps, momentum=o.muon_momentum)
    return torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=False, foreach=False)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, parallelism: Parallelism, micro_batch_size: int,
                 grad_accum_steps: int):
    """deepspeed.initialize on a model that parallelize() has already prepared.
    Expert shards are saved and loaded by moetrain.checkpoint, not by the engine."""
    import deepspeed

    # DeepSpeed averages over every rank, sequence-parallel ones included (moetrain/parallel/sequence.py)
    ds_config = derive_deepspeed_config(cfg, parallelism.dims.zero_world, micro_batch_size, grad_accum_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds_config)
    if isinstance(getattr(engine.optimizer, "optimizer", None), MoonlightMuon) and \
            hasattr(engine.optimizer, "round_robin_bit16_groups"):  # ZeRO-1/2: Muon sees flat partitions
        attach_zero_layouts(engine.optimizer)
    return engine


def set_engine_batch(engine, micro_batch_size: int, grad_accum_steps: int, dp_world: int) -> None:
    """Stage transition: change micro-batch and accumulation in place."""
    if hasattr(engine, "set_train_micro_batch_size"):
        engine.set_train_micro_batch_size(micro_batch_size)
    engine.set_train_batch_size(micro_batch_size * grad_accum_steps * dp_world)
