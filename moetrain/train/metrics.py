"""Metrics sinks on rank 0: metrics.jsonl, console (tqdm or plain), W&B."""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from typing import Optional

import torch

from moetrain.config import TrainConfig, to_dict

# Dense bf16 peak FLOP/s from vendor spec sheets, by substring of the device name.
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                  "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def measure_cpu_peak_flops(n: int = 1024, reps: int = 8) -> float:
    """Measured fp32 matmul throughput of this CPU (the MFU denominator on CPU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def device_peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAK_BF16.items():
            if key in name:
                return peak
        return 100e12
    return measure_cpu_peak_flops()


def wandb_mode(configured: str) -> str:
    """'online' quietly becomes 'offline' when no W&B API key is configured."""
    if configured != "online":
        return configured
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.expanduser("~/.netrc")
    if os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read():
        return "online"
    return "offline"


class MetricsLogger:
    """Only rank 0 writes; other ranks get a no-op instance."""

    def __init__(self, cfg: TrainConfig, run_dir: str, rank: int, total_steps: int, start_step: int,
                 wandb_id: Optional[str] = None):
        self.enabled = rank == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total, self.bar, self.wandb = total_steps, None, None
        self.wandb_id = wandb_id
        self.t0, self.step0 = time.time(), start_step
        if not self.enabled:
            return
        if cfg.logging.console == "tqdm":
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            file=sys.stderr)
        self._init_wandb(cfg, run_dir)

    def _init_wandb(self, cfg: TrainConfig, run_dir: str) -> None:
        mode = wandb_mode(cfg.logging.wandb.mode)
        if mode == "disabled":
            return
        import wandb
        w = cfg.logging.wandb
        self.wandb_id = self.wandb_id or secrets.token_hex(4)  # not the global RNG: resume stays exact
        self.wandb = wandb.init(project=w.project, entity=w.entity, name=w.name or os.path.basename(run_dir),
                                tags=list(w.tags), config=to_dict(cfg), dir=run_dir, id=self.wandb_id,
                                resume="allow", mode=mode)

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
            flat["stage"] = rec.get("stage")
            self.wandb.log(flat, step=rec["step"])
        self.console(rec)

    def console(self, rec: dict) -> None:
        done = rec["step"] - self.step0
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - rec["step"])
        line = (f"step {rec['step']}/{self.total} [{rec['stage']}] loss {rec['loss']:.4f} "
                f"lr {rec['lr']:.2e} tok/s {rec['tokens_per_s']:.0f} mfu {100 * rec['mfu']:.1f}% "
                f"eta {eta / 60:.1f}m")
        if self.bar is not None:
            self.bar.n = rec["step"]
            self.bar.set_postfix_str(f"loss {rec['loss']:.3f} tok/s {rec['tokens_per_s']:.0f}")
            self.bar.write(line)
        else:
            print(line, flush=True)

    def event(self, rec: dict) -> None:
        """Non-step records (stage evals); also to W&B under their own keys."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"},
                           step=rec["step"])
        msg = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items())
        (self.bar.write if self.bar is not None else print)(msg)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def router_health(stats_per_layer: list[torch.Tensor]) -> dict:
    """From per-layer expert token counts: shares, max/mean imbalance, dead experts."""
    out: dict = {}
    if not stats_per_layer:
        return out
    worst = 0.0
    for i, counts in enumerate(stats_per_layer):
        c = counts.double()
        share = c / c.sum().clamp_min(1)
        imb = float(share.max() * len(share))
        worst = max(worst, imb)
        out[f"moe/layer{i}/max_over_mean"] = imb
        out[f"moe/layer{i}/dead_experts"] = int((counts == 0).sum())
        out[f"moe/layer{i}/expert_share"] = [round(float(s), 5) for s in share]
    out["moe/max_over_mean"] = worst
    return out


def finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
