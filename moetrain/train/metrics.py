"""Metric helpers: peak FLOP/s (the MFU denominator), the W&B mode, and MoE router
statistics packed as tensors (summed over micro-batches, steps and ranks) with
the health report computed from them. The sinks are callbacks in sinks.py."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch

# Dense bf16 peak FLOP/s from vendor spec sheets, by substring of the device name.
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                  "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def measure_cpu_peak_flops(n: int = 1024, reps: int = 4, trials: int = 5, clock=time.perf_counter) -> float:
    """Measured fp32 matmul throughput of this CPU (the MFU denominator on CPU): the best of
    several trials, so a momentarily busy machine doesn't lower it. `clock=time.process_time`
    gives FLOPs per CPU-second of all threads instead of per wall second."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(trials):
        t = clock()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / max(clock() - t, 1e-9))
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


# --------------------------------------------------------------------------- MoE router health
# One forward's router stats per MoE layer, packed as a float64 vector of sums so that
# micro-batches, ranks and log steps add up: [counts over E experts..., *_ROUTER_SCALARS].
_ROUTER_SCALARS = ("entropy", "lb_loss", "z_loss", "seq_loss", "dropped", "assignments", "tokens", "forwards")


def add_router_stats(acc: Optional[torch.Tensor], moe_stats: list) -> Optional[torch.Tensor]:
    """Add one forward's `ModelOutput.moe_stats` to `acc` (None to start): a
    [layers, E + len(_ROUTER_SCALARS)] float64 tensor on the stats' device
    (no host copy; None while there are no MoE layers)."""
    if not moe_stats:
        return acc
    dev = moe_stats[0]["counts"].device
    rows = []
    for s in moe_stats:
        vals = {**s, "forwards": 1}
        scal = torch.stack([torch.as_tensor(vals.get(k, 0.0), dtype=torch.float64, device=dev).detach()
                            for k in _ROUTER_SCALARS])
        rows.append(torch.cat([s["counts"].detach().to(torch.float64), scal]))
    new = torch.stack(rows)
    return new if acc is None else acc + new


def reduce_router_stats(acc: Optional[torch.Tensor], group=None) -> Optional[torch.Tensor]:
    """The packed stats summed over data-parallel ranks (collective when initialised)."""
    import torch.distributed as dist
    if acc is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return acc
    out = acc.clone()
    dist.all_reduce(out, group=group)
    return out


def router_counts(acc: torch.Tensor) -> torch.Tensor:
    """Per-layer expert counts [layers, E] out of packed stats (for the aux-loss-free bias update)."""
    return acc[:, :-len(_ROUTER_SCALARS)]


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
    """Router health over a logging window: observe() every optimizer step (this
    rank's stats), flush() at each log (summed over ranks there, once). A layer whose busiest expert
    takes more than `collapse_frac` of the tokens (and at least twice its fair
    share) for `patience` logs in a row triggers a console warning on rank 0, repeated
    every `patience` logs; from ESCALATE x patience logs in a row it is an error line.
    `moe/collapse_level` records the worst layer: 0 healthy or not yet persistent,
    1 warning, 2 error."""

    ESCALATE = 3

    def __init__(self, collapse_frac: float = 0.5, patience: int = 3):
        self.collapse_frac, self.patience = collapse_frac, patience
        self.window: Optional[torch.Tensor] = None
        self.streak: dict = {}

    def observe(self, acc: Optional[torch.Tensor]) -> None:
        """Add one step's packed stats (device tensor; stays on the device)."""
        if acc is not None:
            self.window = acc.clone() if self.window is None else self.window + acc

    def flush(self, group=None) -> dict:
        """Health over the window, summed over the ranks of `group` first (collective
        when distributed: every rank calls it); one host copy."""
        if self.window is None:
            return {}
        layers = [_unpack(v) for v in reduce_router_stats(self.window, group).cpu()]
        self.window = None
        out = router_health(layers)
        collapsed = [i for i, st in enumerate(layers) if self._collapsed(st)]
        for i in range(len(layers)):
            self.streak[i] = self.streak.get(i, 0) + 1 if i in collapsed else 0
        out["moe/collapsed_layers"] = len(collapsed)
        out["moe/collapse_level"] = max((self._level(self.streak[i]) for i in collapsed), default=0)
        self._warn([i for i in collapsed if self.streak[i] % self.patience == 0], out)
        return out

    def _level(self, streak: int) -> int:
        return 0 if streak < self.patience else 1 if streak < self.ESCALATE * self.patience else 2

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
            level = "ERROR" if self._level(self.streak[i]) == 2 else "WARNING"
            print(f"{level}: MoE layer {i} collapsed: expert {share.index(max(share))} took "
                  f"{100 * out[f'moe/layer{i}/top_token_frac']:.0f}% of tokens for {self.streak[i]} logs in a row "
                  f"(max/mean {out[f'moe/layer{i}/max_over_mean']:.1f}); raise model.moe.aux_loss_coef or "
                  "bias_update_speed, or lower the LR", file=sys.stderr, flush=True)
