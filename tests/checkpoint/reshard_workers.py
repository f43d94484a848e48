"""Runs of the real trainer at 1 or 2 processes (CPU, gloo) for the resharding tests.
Kept out of the test module so that spawned children import little."""
from __future__ import annotations

import json
import os
import socket

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT = os.path.join(ROOT, "configs", "default.yaml")


def overrides(data_dir: str, steps: int, **extra) -> list[str]:
    """A tiny MoE on the prepared corpus, fp32, global batch 4 sequences of 64 tokens,
    micro-batch 2: 1 process accumulates 2 micro-batches, 2 processes 1 each."""
    ov = {
        "model.vocab_size": 512, "model.hidden_size": 32, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.intermediate_size": 64, "model.moe.n_experts": 4, "model.moe.top_k": 2,
        "model.moe.intermediate_size": 32, "model.moe.first_k_dense": 0,
        "model.attention.layer_types": "[sliding, full]", "model.attention.window": 32,
        "data.dir": data_dir, "data.recipe": "null",
        "stages": f"[{{name: main, seq_len: 64, steps: {steps}}}]",
        "train.micro_batch_size": 2, "train.grad_accum_steps": "null", "train.global_batch_size": 4,
        "train.precision": "fp32", "train.eval_batches": 1,
        "optim.warmup_steps": 2, "optim.lr": 3e-3,
        "logging.every_steps": 1, "logging.console": "plain", "logging.wandb.mode": "disabled",
        "checkpoint.every_steps": 1000, "eval.enabled": "false",
        "data.synthetic": "{}", "export.enabled": "false", "eval.lengths": "[]",
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, ov: list, run_dir: str, resume: str) -> None:
    # the environment a launcher (torchrun, deepspeed) gives each process
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    torch.set_num_threads(1)
    from moetrain.compose import train
    from moetrain.config import load_config
    train(load_config(DEFAULT, ov), run_dir, resume=resume)


def run(world: int, ov: list, run_dir: str, resume: str = "auto") -> None:
    """Train in `world` fresh processes (spawned even for 1: every run starts clean)."""
    os.environ["MASTER_PORT"] = str(_free_port())
    torch.multiprocessing.spawn(_worker, args=(world, ov, run_dir, resume), nprocs=world, join=True)


def step_losses(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in recs if "event" not in r}
