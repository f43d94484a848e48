"""Benchmark one MoE layer, forward + backward: our grouped path, our per-expert
loop reference, and transformers' Mixtral / Qwen2-MoE sparse blocks holding the
same weights, on the same tokens.

    python scripts/bench_moe.py                       # both default shapes
    python scripts/bench_moe.py --tokens 1024 --iters 3 --shapes e8k2

Shapes: e8k2 = 8 experts, top-2, F = 4d (Mixtral-like); e64k8 = 64 fine-grained
experts, top-8, F = d/4. The Qwen2-MoE rows add a sigmoid-gated shared expert
(ours gets the same one). HF blocks run with experts_implementation eager
(their default outside a PreTrainedModel) and grouped_mm (the default inside one).

Timing: all implementations of a shape live in one process and take turns,
one step each, so a noisy shared machine slows them alike; tok/s uses the
fastest of --iters steps. Peak memory: bytes above the warm state during one
step (CUDA: max_memory_allocated; CPU: the process high-water mark VmHWM,
reset through /proc/self/clear_refs after returning freed heap to the OS).
Our layer also computes its balancing / z losses and router stats.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from moetrain.benchmark import peak_bytes, timed

SHAPES = {"e8k2": dict(n_experts=8, top_k=2, ffn_mult=4.0), "e64k8": dict(n_experts=64, top_k=8, ffn_mult=0.25)}
IMPLS = ("ours_grouped", "ours_loop", "hf_mixtral_eager", "hf_mixtral_grouped_mm",
         "ours_grouped_shared", "hf_qwen2_eager", "hf_qwen2_grouped_mm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="e8k2,e64k8", help=f"subset of {','.join(SHAPES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help="subset of " + ",".join(IMPLS))
    p.add_argument("--hidden", type=int, default=512, help="model width d")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per forward (B*S)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def build(impl: str, shape: dict, d: int):
    """(module, forward returning (y, aux)) with weights from one seeded MoE of ours."""
    from moetrain.config import config_from_dict
    from moetrain.model.moe import LocalDispatcher, MoE, experts_loop
    E, K = shape["n_experts"], shape["top_k"]
    F = int(d * shape["ffn_mult"])
    shared = "shared" in impl or "qwen2" in impl
    moe = dict(n_experts=E, top_k=K, intermediate_size=F, norm_topk_prob=not shared)
    if shared:
        moe.update(n_shared_experts=1, shared_expert_intermediate_size=F * K, shared_expert_gate=True)
    cfg = config_from_dict({"model": dict(vocab_size=128, hidden_size=d, n_layers=1, n_heads=8, n_kv_heads=8,
                                          intermediate_size=4 * d, moe=moe)}).model
    torch.manual_seed(0)
    ours = MoE(cfg)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if impl.startswith("ours"):
        if impl == "ours_loop":
            ours.set_dispatcher(LocalDispatcher(experts_loop))
        return ours, lambda x: ours(x)
    hf = _hf_block(impl, ours, d, F, E, K)
    return hf, lambda x: (hf(x), None)


@torch.no_grad()
def _hf_block(impl: str, ours, d: int, F: int, E: int, K: int):
    if "mixtral" in impl:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=F, num_local_experts=E,
                                                 num_experts_per_tok=K, router_jitter_noise=0.0))
    else:
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        hf = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=d, moe_intermediate_size=F, num_experts=E,
                                                   num_experts_per_tok=K, norm_topk_prob=False,
                                                   shared_expert_intermediate_size=F * K))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_expert, proj).weight.copy_(getattr(ours.shared_experts, proj).weight)
        hf.shared_expert_gate.weight.copy_(ours.shared_gate.weight)
    hf.experts.config._experts_implementation = "grouped_mm" if impl.endswith("grouped_mm") else "eager"
    hf.gate.weight.copy_(ours.router.gate.weight)
    hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.gate_EFd, ours.experts.up_EFd], dim=1))
    hf.experts.down_proj.copy_(ours.experts.down_EdF)
    return hf


class Runner:
    """One implementation on one shape: a forward+backward step, timed and measured."""

    def __init__(self, impl: str, shape: str, a):
        self.impl, self.dev = impl, torch.device(a.device)
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        self.mod, self.fwd = build(impl, SHAPES[shape], a.hidden)
        self.mod.to(self.dev, dtype).train()
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(1, a.tokens, a.hidden, generator=g).to(self.dev, dtype).requires_grad_()
        self.grad_y = torch.randn(1, a.tokens, a.hidden, generator=g).to(self.dev, dtype)
        self.times: list = []

    def step(self) -> None:
        y, aux = self.fwd(self.x)
        ((y * self.grad_y).float().sum() + (aux if aux is not None else 0.0)).backward()
        self.mod.zero_grad(set_to_none=False)
        self.x.grad = None

    def timed_step(self) -> None:
        self.times.append(timed(self.step, self.dev))

    def peak_bytes(self) -> int:
        """Memory above the warm state during one step."""
        return peak_bytes(self.step, self.dev)


def bench_shape(shape: str, a) -> list:
    runners = [Runner(impl, shape, a) for impl in a.impls.split(",")]
    for r in runners:
        for _ in range(a.warmup):
            r.step()
    for i in range(a.iters):  # take turns; rotate the order so none always runs first
        for r in runners[i % len(runners):] + runners[:i % len(runners)]:
            r.timed_step()
    rows = []
    for r in runners:
        best, med = min(r.times), sorted(r.times)[len(r.times) // 2]
        rows.append({"impl": r.impl, "shape": shape, "tokens_per_s": a.tokens / best, "ms": 1e3 * best,
                     "median_ms": 1e3 * med, "peak_mib": r.peak_bytes() / 2**20})
    return rows


def print_table(shape: str, rows: list, a) -> None:
    s = SHAPES[shape]
    print(f"\n{shape}: E={s['n_experts']} k={s['top_k']} d={a.hidden} F={int(a.hidden * s['ffn_mult'])} "
          f"T={a.tokens} {a.device} {a.dtype} threads={torch.get_num_threads()}")
    print(f"{'impl':<24}{'tok/s':>10}{'best ms':>9}{'med ms':>9}{'peak MiB':>10}{'vs ours':>9}")
    ref = {r["impl"]: r for r in rows}
    for r in rows:
        base = ref.get("ours_grouped_shared" if ("qwen2" in r["impl"] or "shared" in r["impl"]) else "ours_grouped")
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{r['impl']:<24}{r['tokens_per_s']:>10.0f}{r['ms']:>9.1f}{r['median_ms']:>9.1f}{r['peak_mib']:>10.1f}"
              f"{ratio:>8.2f}x")


def main(argv=None) -> int:
    a = parse_args(argv)
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for shape in a.shapes.split(","):
        rows = bench_shape(shape, a)
        print_table(shape, rows, a)
        results += rows
    print("\n'vs ours': throughput relative to our grouped path with the same weights (Qwen2 rows: with the "
          "shared expert); > 1 means faster than ours.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
