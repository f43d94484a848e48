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


def measure_cpu_peak_flops(n: int = 1024, reps: int = 4, trials: int = 5) -> float:
    """Measured fp32 matmul throughput of this CPU (the MFU denominator on CPU):
    the best of several trials, so a momentarily busy machine doesn't lower it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


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
            import wandb
            flat = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
            # Per-expert token shares: one histogram per layer and step.
            flat.update({k: wandb.Histogram(v) for k, v in rec.items() if isinstance(v, list) and v})
            flat["stage"] = rec.get("stage")
            self.wandb.log(flat, step=rec["step"])
        self.console(rec)

    def console(self, rec: dict) -> None:
        done = rec["step"] - self.step0
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - rec["step"])
        gn = "" if rec.get("grad_norm") is None else f"gnorm {rec['grad_norm']:.3f} "
        line = (f"step {rec['step']}/{self.total} [{rec['stage']}] loss {rec['loss']:.4f} {gn}"
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


# --------------------------------------------------------------------------- MoE router health
# One forward's router stats per MoE layer, packed as a float64 vector of sums so that
# micro-batches, ranks and log steps add up: [counts over E experts..., *_ROUTER_SCALARS].
_ROUTER_SCALARS = ("entropy", "lb_loss", "z_loss", "seq_loss", "dropped", "assignments", "tokens", "forwards")


def add_router_stats(acc: Optional[list], moe_stats: list) -> list:
    """Add one forward's `ModelOutput.moe_stats` to `acc` (None to start); one
    device-to-host copy for all layers."""
    if not moe_stats:
        return acc or []
    dev = moe_stats[0]["counts"].device
    rows = []
    for s in moe_stats:
        vals = {**s, "forwards": 1}
        scal = torch.stack([torch.as_tensor(vals.get(k, 0.0), dtype=torch.float64, device=dev).detach()
                            for k in _ROUTER_SCALARS])
        rows.append(torch.cat([s["counts"].detach().to(torch.float64), scal]))
    new = list(torch.stack(rows).cpu())
    return new if not acc else [a + b for a, b in zip(acc, new)]


def reduce_router_stats(acc: list, group=None) -> list:
    """Sum the packed stats over data-parallel ranks (collective when initialised)."""
    import torch.distributed as dist
    if not acc or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return acc
    stacked = torch.stack(acc)
    dist.all_reduce(stacked, group=group)
    return list(stacked)


def router_counts(acc: list) -> list:
    """Per-layer expert counts out of packed stats (for the aux-loss-free bias update)."""
    return [v[:-len(_ROUTER_SCALARS)] for v in acc]


def _unpack(v: torch.Tensor) -> dict:
    n = len(_ROUTER_SCALARS)
    return {"counts": v[:-n], **{k: float(x) for k, x in zip(_ROUTER_SCALARS, v[-n:])}}


def router_health(stats_per_layer: list) -> dict:
    """Per-layer router health from expert-count tensors, or from dicts of summed
    stats (counts + _ROUTER_SCALARS, as RouterMonitor passes them). Keys
    moe/layer{i}/...: expert_share (token share per expert, a list),
    max_over_mean (load imbalance), dead_experts (no tokens in the window); with
    full stats also entropy (nats per token; ln E = uniform), dropped_share,
    top_token_frac (tokens the busiest expert took), lb_loss / z_loss /
    seq_loss (means). moe/* summarise over layers."""
    out: dict = {}
    worst, dead, dropped, assigned, entropies = 0.0, 0, 0.0, 0.0, []
    for i, item in enumerate(stats_per_layer):
        st = item if isinstance(item, dict) else {"counts": item}
        c = st["counts"].double()
        share = c / c.sum().clamp_min(1)
        imb = float(share.max() * len(share))
        p = f"moe/layer{i}/"
        out[p + "max_over_mean"], out[p + "dead_experts"] = imb, int((c == 0).sum())
        out[p + "expert_share"] = [round(float(s), 5) for s in share]
        worst, dead = max(worst, imb), dead + out[p + "dead_experts"]
        n = st.get("forwards", 0)
        if n:
            out[p + "entropy"] = st["entropy"] / n
            out[p + "dropped_share"] = st["dropped"] / max(st["assignments"], 1)
            out[p + "top_token_frac"] = float(c.max()) / max(st["tokens"], 1)
            for k in ("lb_loss", "z_loss", "seq_loss"):
                if k != "seq_loss" or st[k]:  # seq_loss only when that loss is on
                    out[p + k] = st[k] / n
            dropped, assigned = dropped + st["dropped"], assigned + st["assignments"]
            entropies.append(out[p + "entropy"])
    if stats_per_layer:
        out["moe/max_over_mean"], out["moe/dead_experts"] = worst, dead
    if entropies:
        out["moe/dropped_share"] = dropped / max(assigned, 1)
        out["moe/entropy"] = sum(entropies) / len(entropies)
    return out


class RouterMonitor:
    """Router health over a logging window: observe() every optimizer step (stats
    already summed over ranks), flush() at each log. A layer whose busiest expert
    takes more than `collapse_frac` of the tokens (and at least twice its fair
    share) for `patience` logs in a row triggers a console warning on rank 0."""

    def __init__(self, collapse_frac: float = 0.5, patience: int = 3):
        self.collapse_frac, self.patience = collapse_frac, patience
        self.window: Optional[list] = None
        self.streak: dict = {}

    def observe(self, acc: list) -> None:
        if acc:
            self.window = list(acc) if self.window is None else [a + b for a, b in zip(self.window, acc)]

    def flush(self) -> dict:
        if not self.window:
            return {}
        layers = [_unpack(v) for v in self.window]
        self.window = None
        out = router_health(layers)
        collapsed = [i for i, st in enumerate(layers) if self._collapsed(st)]
        for i in range(len(layers)):
            self.streak[i] = self.streak.get(i, 0) + 1 if i in collapsed else 0
        out["moe/collapsed_layers"] = len(collapsed)
        self._warn([i for i in collapsed if self.streak[i] % self.patience == 0], out)
        return out

    def _collapsed(self, st: dict) -> bool:
        c, tokens = st["counts"], max(st["tokens"], 1)
        frac, fair = float(c.max()) / tokens, st["assignments"] / tokens / len(c)
        return frac > self.collapse_frac and frac >= 2 * fair

    def _warn(self, layers: list, out: dict) -> None:
        import torch.distributed as dist
        if not layers or (dist.is_initialized() and dist.get_rank() != 0):
            return
        for i in layers:
            share = out[f"moe/layer{i}/expert_share"]
            print(f"WARNING: MoE layer {i} collapsed: expert {share.index(max(share))} took "
                  f"{100 * out[f'moe/layer{i}/top_token_frac']:.0f}% of tokens for {self.streak[i]} logs in a row "
                  f"(max/mean {out[f'moe/layer{i}/max_over_mean']:.1f}); raise model.moe.aux_loss_coef or "
                  "bias_update_speed, or lower the LR", file=sys.stderr, flush=True)


def finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
