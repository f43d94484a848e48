"""Train steps side by side: moetrain against transformers' MixtralForCausalLM (SDPA),
same model shape, batch, length, optimizer (AdamW) and dtype, every point in its own
process under a memory cap, all in one run.

    python scripts/bench_vs_hf.py                                   # CPU, fp32, 2k..32k, 20 GB
    python scripts/bench_vs_hf.py --budget-gb 8 --max-search-len 131072 --json out.json
    python scripts/bench_vs_hf.py --device cuda --config configs/h100_moe1b_zero2.yaml \\
        --set model.n_layers=4 --variants cfg --seq-lens 4096 --no-search   # node-shape smoke
    python scripts/bench_vs_hf.py --tiny                            # a minute or two: checks the script
    python scripts/bench_vs_hf.py --report out.json                 # the tables again from a --json file

Variants: `hf` (transformers Mixtral, SDPA, every layer MoE, its default loss over full
logits); ours `dense` / `sliding` / `moba` (that pattern in every layer) or `cfg` (the
config's own layer types), each optionally `+mem`: activation checkpointing of every
block, tiled MoE/MLP (--tile-tokens), the LM head in blocks of --loss-chunk rows, and
offload of saved tensors on CUDA / freed memory returned to the OS at once on CPU
(memory.release_host_memory, with transparent huge pages for blocks of 2 MiB and more).
Our CPU variants set glibc malloc as the Trainer does; transformers runs with glibc's defaults.
Per point: --warmup untimed steps, then --steps timed ones; tokens/s from the median
step. Peak memory is the whole process: peak RSS (VmHWM) on CPU, max_memory_allocated
on CUDA. A point that would not fit the budget (the variant already failed at a shorter
length, or a linear extrapolation of its last two points exceeds the budget) is skipped
and the table says why. The longest trainable sequence per --search-variants: double
from the longest point that ran, then bisect; each try is one full training step
(forward, backward, AdamW) in its own process under the cap (cgroup memory limit on
CPU, torch's per-process memory fraction on CUDA), so a blow-up kills only that try.
MFU: model FLOPs of the pattern actually run (moetrain.flops: 6 x active non-embedding
params + 12 x heads x head_dim per visible causal (query, key) pair; recompute not
counted) over the bf16 spec sheet peak on GPU; on CPU from CPU time, so that other load
on a shared machine cancels: FLOPs per CPU-second of the step over the FLOPs per
CPU-second of a large fp32 matmul measured here (`tok/cpu-s` = tokens per CPU-second).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import torch

from moetrain.benchmark import cpu_matmul_flops_per_cpu_s, longest, memory_cap, watch_rss

GB = 1e9
SHAPE = dict(vocab_size=32768, hidden_size=256, n_layers=4, n_heads=8, n_kv_heads=2, intermediate_size=512,
             qk_norm=False, **{"moe.n_experts": 8, "moe.top_k": 2, "moe.intermediate_size": 512,
                               "moe.first_k_dense": 0})
TINY = dict(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
            qk_norm=False, **{"moe.n_experts": 4, "moe.top_k": 2, "moe.intermediate_size": 64,
                              "moe.first_k_dense": 0})
PATTERNS = {"dense": "full", "sliding": "sliding", "moba": "moba", "cfg": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--seq-lens", default="2048,8192,16384,32768")
    p.add_argument("--variants", default="hf,dense,sliding,sliding+mem,moba")
    p.add_argument("--search-variants", default="hf,sliding+mem")
    p.add_argument("--variant-max-len", default="", help="e.g. dense=8192,hf=8192: no sweep points above")
    p.add_argument("--no-search", action="store_true")
    p.add_argument("--budget-gb", type=float, default=20.0, help="memory cap of every point and search try")
    p.add_argument("--max-search-len", type=int, default=1 << 21, help="stop doubling here")
    p.add_argument("--search-start", default="", help="e.g. sliding+mem=1048576: that variant's first try "
                   "(default: the longest point the sweep ran)")
    p.add_argument("--search-granule", type=int, default=1024, help="bisection step; stop within 1/8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--window", type=int, default=None, help="default 1024 (with --config: its own)")
    p.add_argument("--moba-block", type=int, default=None, help="default 512 (with --config: its own)")
    p.add_argument("--moba-topk", type=int, default=None, help="default 3 (with --config: its own)")
    p.add_argument("--tile-tokens", type=int, default=1024, help="memory.mlp_tile_tokens of +mem variants")
    p.add_argument("--loss-chunk", type=int, default=256, help="model.loss_chunk_size of +mem variants "
                   "(rows of the LM head's [rows, vocab] block)")
    p.add_argument("--config", default=None, help="take our model shape from this YAML instead of the "
                   "built-in one (d=256, 4 layers, 8 experts top-2 of 512, 8/2 heads, vocab 32k)")
    p.add_argument("--set", action="append", default=[], help="dotted config override (repeatable)")
    p.add_argument("--tiny", action="store_true", help="tiny shape and lengths: a fast check of the script")
    p.add_argument("--point-timeout", type=float, default=1800.0, help="seconds before a try is killed")
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: run one point, print RESULT
    p.add_argument("--gpu-summary", default=None, metavar="DIR", help="print gpu_check.sh's table from DIR")
    p.add_argument("--report", default=None, metavar="JSON", help="print the tables of a --json file and exit")
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    defaults = (64, 32, 3) if a.tiny else (1024, 512, 3)
    if a.config is None:
        a.window, a.moba_block, a.moba_topk = (x if x is not None else d for x, d in
                                               zip((a.window, a.moba_block, a.moba_topk), defaults))
    if a.tiny:
        a.seq_lens = "128,256" if a.seq_lens == p.get_default("seq_lens") else a.seq_lens
        a.tile_tokens, a.search_granule, a.loss_chunk = 64, 64, 64
        a.max_search_len = min(a.max_search_len, 1024)
    return a


# ----------------------------------------------------------------------------- configs and FLOPs
def split_variant(v: str) -> tuple[str, bool]:
    pattern, _, mem = v.partition("+")
    if v != "hf" and (pattern not in PATTERNS or mem not in ("", "mem")):
        raise SystemExit(f"bench_vs_hf: unknown variant '{v}'; use hf or one of {', '.join(PATTERNS)} "
                         "optionally followed by +mem")
    return pattern, bool(mem)


def train_config(a, variant: str, device: str):
    """Our TrainConfig for a variant: the shape, then the pattern, the memory tools, --set."""
    from moetrain.config import config_from_dict, load_config
    pattern, mem = split_variant(variant)
    ov = [] if a.config else [f"model.{k}={v}" for k, v in (TINY if a.tiny else SHAPE).items()]
    kind = PATTERNS.get(pattern)
    if kind:  # "hf" and "dense" are the same all-full model
        ov += [f"model.attention.layer_types=[{kind}]", "model.attention.full_attention_last_n=0"]
        ov += [f"model.attention.{k}={x}" for k, x in (("window", a.window), ("block_size", a.moba_block),
                                                        ("moba_topk", a.moba_topk)) if x is not None]
    if pattern != "cfg" or mem:
        ov += ["model.activation_checkpointing=false", f"memory.checkpoint={'full' if mem else 'none'}",
               f"memory.mlp_tile_tokens={a.tile_tokens if mem else 0}",
               f"memory.offload={'true' if mem and device == 'cuda' else 'false'}",
               f"memory.release_host_memory={'true' if mem and device == 'cpu' else 'false'}"]
        if mem:
            ov.append(f"model.loss_chunk_size={a.loss_chunk}")
    ov += list(a.set)
    return load_config(a.config, ov) if a.config else config_from_dict({}, ov)


def flops_per_token(mcfg, S: int) -> float:
    """Training FLOPs per token of the pattern mcfg really runs, one document of S tokens
    (moetrain.flops: 6 x active non-embedding params + 12 x Hq x D per visible pair)."""
    from moetrain.flops import train_flops_per_token
    from moetrain.model import build_model
    with torch.device("meta"):
        counts = build_model(mcfg).param_counts()
    return train_flops_per_token(mcfg, counts, S)


# ----------------------------------------------------------------------------- one point (child process)
def build_hf(mcfg, S: int):
    from transformers import MixtralConfig, MixtralForCausalLM
    from moetrain.config import head_dim
    hc = MixtralConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size, head_dim=head_dim(mcfg),
                       intermediate_size=mcfg.moe.intermediate_size, num_hidden_layers=mcfg.n_layers,
                       num_attention_heads=mcfg.n_heads, num_key_value_heads=mcfg.n_kv_heads,
                       num_local_experts=mcfg.moe.n_experts, num_experts_per_tok=mcfg.moe.top_k,
                       max_position_embeddings=max(S, 4096), rms_norm_eps=mcfg.rms_norm_eps,
                       tie_word_embeddings=mcfg.tie_embeddings, router_jitter_noise=0.0)
    model = MixtralForCausalLM._from_config(hc, attn_implementation="sdpa")
    # HF shifts labels itself: position t predicts ids[t+1], as ours does with labels = ids[1:]
    return model, lambda ids: model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss


def build_ours(cfg):
    from moetrain.model import build_model
    from moetrain.parallel.memory import apply_memory
    model = build_model(cfg.model)
    apply_memory(model, cfg)
    return model, lambda ids: model(ids[:, :-1], labels=ids[:, 1:]).loss


def run_point(p: dict) -> dict:
    """One point: build, warm up, time; called in a fresh process (`--point`)."""
    from moetrain.benchmark import proc_status, timed
    from moetrain.train.host_alloc import apply_host_memory, huge_pages_in_use
    a = argparse.Namespace(**p["args"])
    cfg = train_config(a, p["variant"], p["device"])
    if p["variant"] != "hf" and p["device"] == "cpu":  # as the Trainer does, before the first tensor:
        apply_host_memory(cfg)  # reuse freed buffers, or release them (+mem, with huge pages)
    device, S = torch.device(p["device"]), p["S"]
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, p["budget_gb"] * GB / total), device)
    torch.manual_seed(0)
    model, loss_fn = build_hf(cfg.model, S) if p["variant"] == "hf" else build_ours(cfg)
    model.to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.randint(cfg.model.vocab_size, (a.batch, S + 1), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()}")

    times, cpu = [], []  # wall and CPU seconds (all threads) per step
    try:
        for _ in range(p["warmup"] + p["steps"]):
            c0 = time.process_time()
            times.append(timed(step, device))
            cpu.append(time.process_time() - c0)
    except torch.OutOfMemoryError:
        return {"status": "oom", "note": "CUDA out of memory"}
    times, cpu = sorted(times[p["warmup"]:]), sorted(cpu[p["warmup"]:])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status("VmHWM")
    return {"status": "ok", "tok_s": a.batch * S / times[len(times) // 2], "step_s": times,
            "tok_cpu_s": a.batch * S / cpu[len(cpu) // 2], "peak_gb": peak / GB,
            "flops_per_token": flops_per_token(cfg.model, S),
            **({"huge_pages": huge_pages_in_use()} if device.type == "cpu" else {})}


# ----------------------------------------------------------------------------- one point under the cap
def run_capped(a, variant: str, S: int, warmup: int, steps: int) -> dict:
    """One point in a fresh process under the memory cap; {'status': ok|oom|timeout|error, ...}."""
    point = {"args": vars(a), "variant": variant, "S": S, "warmup": warmup, "steps": steps,
             "device": a.device, "budget_gb": a.budget_gb}
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(point)]
    host_cap = a.budget_gb * GB if a.device == "cpu" else 0.9 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    t0, fired = time.time(), []
    with memory_cap(host_cap, f"bench_vs_hf-{os.getpid()}-{variant}-{S}") as join:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=join)
        if join is None:
            threading.Thread(target=watch_rss, args=(proc, host_cap, fired), daemon=True).start()
        try:
            out, err = proc.communicate(timeout=a.point_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"status": "timeout", "note": f"killed after {a.point_timeout:.0f} s", "wall_s": time.time() - t0}
        except BaseException:  # interrupted (SIGTERM, Ctrl-C): take the child with us
            proc.kill()
            proc.wait()
            raise
    res = next((json.loads(l[7:]) for l in reversed(out.splitlines()) if l.startswith("RESULT ")), None)
    if res is None:
        killed = proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
        res = ({"status": "oom", "note": f"killed at the {a.budget_gb:g} GB cap"} if killed or fired else
               {"status": "error", "note": (err.strip().splitlines() or ["no output"])[-1][:160]})
    res["wall_s"] = time.time() - t0
    return res


# ----------------------------------------------------------------------------- sweep and search
def predicted_gb(history: list, S: int):
    """Linear extrapolation of peak memory from the last two successful (S, GB) points."""
    ok = [(s, r["peak_gb"]) for s, r in history if r["status"] == "ok"]
    if len(ok) < 2:
        return None
    (s1, m1), (s2, m2) = ok[-2:]
    return m2 + (m2 - m1) / (s2 - s1) * (S - s2)


def sweep(a, log, res=None) -> dict:
    """{variant: [(S, result)]} over --seq-lens, shortest first, skipping what cannot fit;
    filled into `res` as it goes (log() may save it)."""
    variants = a.variants.split(",")
    for v in variants:
        split_variant(v)
    max_len = {k: int(x) for k, _, x in (kv.partition("=") for kv in a.variant_max_len.split(",") if kv)}
    res = {} if res is None else res
    res.update({v: [] for v in variants})
    for S in sorted(int(s) for s in a.seq_lens.split(",")):
        for v in variants:
            if S > max_len.get(v, S):
                continue
            failed = [s for s, r in res[v] if r["status"] in ("oom", "skip", "timeout")]
            pred = predicted_gb(res[v], S)
            if failed:
                r = {"status": "skip", "note": f"did not fit {a.budget_gb:g} GB at {failed[0]}"}
            elif pred is not None and pred > 1.05 * a.budget_gb:
                r = {"status": "skip", "note": f"predicted {pred:.1f} GB > {a.budget_gb:g} GB budget"}
            else:
                r = run_capped(a, v, S, a.warmup, a.steps)
            res[v].append((S, r))
            log(f"{v:>12} S={S:<8} {fmt_result(r)}")
    return res


def search(a, sweep_res: dict, log, out=None) -> dict:
    """{variant: longest trainable S and its result}, filled into `out` after every try
    (marked partial until the variant's search ends), so a killed run still tells."""
    out = {} if out is None else out
    first = {k: int(x) for k, _, x in (kv.partition("=") for kv in getattr(a, "search_start", "").split(",") if kv)}
    for v in a.search_variants.split(","):
        split_variant(v)
        done = {S: r for S, r in sweep_res.get(v, []) if r["status"] == "ok"}
        results, tried = dict(done), []

        def summary(lo, hi, capped, partial):
            return {"longest": lo, "first_fail": hi, "capped": capped, "partial": partial,
                    "result": results.get(lo), "tries": [(S, results[S]["status"]) for S in tried]}

        def try_fn(S, v=v):
            if S not in results:
                results[S] = run_capped(a, v, S, 0, 1)
                tried.append(S)
                ok = [s for s, r in results.items() if r["status"] == "ok"]
                bad = [s for s, r in results.items() if r["status"] != "ok" and s > max(ok, default=0)]
                out[v] = summary(max(ok, default=None), min(bad, default=None), False, True)
                log(f"{v:>12} search S={S:<8} {fmt_result(results[S])}")
            else:
                tried.append(S)
            return results[S]["status"] == "ok"
        start = first.get(v) or (max(done) if done else min(int(s) for s in a.seq_lens.split(",")))
        lo, hi, _ = longest(try_fn, start, a.max_search_len, a.search_granule)
        out[v] = summary(lo, hi, hi is None, False)
        log(f"{v:>12} longest {lo} (first failure {hi})")
    return out


# ----------------------------------------------------------------------------- tables
def fmt_result(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('note', '')}"
    return (f"{r['tok_s']:.0f} tok/s ({r['tok_cpu_s']:.0f} per CPU-s), peak {r['peak_gb']:.2f} GB, "
            f"{r.get('wall_s', 0):.0f} s")


def _get(res, v, S):
    return next((r for s, r in res.get(v, []) if s == S and r["status"] == "ok"), None)


def _ratio(x, y):
    return x / y if x is not None and y else None


def points_table(res: dict, peak_flops: float, rate: str = "tok_s") -> list[str]:
    lines = [f"{'S':>8} {'variant':<13}{'tok/s':>8}{'tok/cpu-s':>10}{'peak GB':>9}{'MFU %':>7}"
             f"{'x hf tok/s':>11}{'x hf cpu':>9}{'x hf mem':>9}  note"]
    lines.append("-" * len(lines[0]))
    for S in sorted({s for rows in res.values() for s, _ in rows}):
        hf = _get(res, "hf", S)
        for v, rows in res.items():
            r = next((r for s, r in rows if s == S), None)
            if r is None:
                continue
            if r["status"] != "ok":
                lines.append(f"{S:>8} {v:<13}{'-':>8}{'-':>10}{'-':>9}{'-':>7}{'':>29}  {r['status']}: {r.get('note', '')}")
                continue
            mfu = 100 * r["flops_per_token"] * r[rate] / peak_flops
            xt = _ratio(r["tok_s"], hf and hf["tok_s"]) if v != "hf" else None
            xc = _ratio(r["tok_cpu_s"], hf and hf["tok_cpu_s"]) if v != "hf" else None
            xm = _ratio(r["peak_gb"], hf and hf["peak_gb"]) if v != "hf" else None
            lines.append(f"{S:>8} {v:<13}{r['tok_s']:>8.0f}{r['tok_cpu_s']:>10.0f}{r['peak_gb']:>9.2f}{mfu:>7.1f}"
                         f"{_x(xt):>11}{_x(xc):>9}{_x(xm):>9}")
    return lines


def _x(r):
    return "" if r is None else f"{r:.2f}x"


def search_table(found: dict, budget: float) -> list[str]:
    lines = [f"longest trainable sequence in {budget:g} GB (one full training step per try)",
             f"{'variant':<13}{'longest':>10}{'tok/s':>8}{'peak GB':>9}  tries"]
    for v, f in found.items():
        r = f["result"] or {}
        n = "-" if f["longest"] is None else (">=" if f["capped"] or f.get("partial") else "") + str(f["longest"])
        tries = " ".join(f"{S}:{st}" for S, st in f["tries"])
        lines.append(f"{v:<13}{n:>10}{r.get('tok_s', math.nan):>8.0f}{r.get('peak_gb', math.nan):>9.2f}  {tries}")
    return lines


def targets_table(a, res: dict, found: dict) -> list[str]:
    """The issue's CPU targets beside what this run measured."""
    mem_v = "sliding+mem"
    rows = []

    def row(name, val, target, ok, why=""):
        val = val or None
        rows.append(f"{name:<52}{val if val is not None else 'n/a':>16}  {target:<10}"
                    f"{('yes' if ok else 'NO') if val is not None else why}")

    def speed_row(name, ours, peer, target, why):  # wall-clock and CPU-time ratios: both must meet it
        if not (ours and peer):
            return row(name, None, f">= {target}x", False, why)
        w, c = ours["tok_s"] / peer["tok_s"], ours["tok_cpu_s"] / peer["tok_cpu_s"]
        rows.append(f"{name:<52}{f'{w:.2f}x/{c:.2f}x':>16}  {f'>= {target}x':<10}"
                    f"{'yes' if min(w, c) >= target else 'NO' if max(w, c) < target else 'mixed'}")
    speed_row("tok/s at 2k, dense: ours / hf (wall/cpu)", _get(res, "dense", 2048), _get(res, "hf", 2048),
              1.0, "(2k hf or dense not run)")
    hf16, m16 = _get(res, "hf", 16384), _get(res, mem_v, 16384)
    speed_row("tok/s at 16k: ours sliding / hf dense (wall/cpu)", _get(res, "sliding", 16384), hf16, 2.5,
              "(16k hf or sliding not run)")
    r = _ratio(m16 and m16["peak_gb"], hf16 and hf16["peak_gb"])
    row(f"peak memory at 16k: ours {mem_v} / hf dense", _x(r), "<= 0.1x", r is not None and r <= 0.1,
        f"(16k hf or {mem_v} not run)")
    ours, peer = found.get(mem_v), found.get("hf")
    lo = ours and ours["longest"]

    def none_passed(f, v):
        if not f:
            return f"({v} not searched)"
        return "(no try passed: " + " ".join(f"{S}:{st}" for S, st in f["tries"]) + ")"
    row(f"longest trainable in {a.budget_gb:g} GB, {mem_v}", lo and (">=" if ours["capped"] else "") + str(lo),
        ">= 1M", lo is not None and lo >= 1 << 20, none_passed(ours, mem_v))
    r = _ratio(lo, peer and peer["longest"])
    row("  ... / hf's longest", _x(r), ">= 32x", r and r >= 32,
        none_passed(peer, "hf") if lo else f"(no {mem_v} length)")
    speed_row(f"  tok/s there / {mem_v} at 32k (wall/cpu)", ours and ours["result"], _get(res, mem_v, 32768), 0.7,
              "(no 32k point)" if lo else f"(no {mem_v} length)")
    head = f"{'target (issue 13; set for 20 GB on a 2-core CPU)':<52}{'measured':>16}  {'target':<10}met"
    return [head, "-" * len(head)] + rows


# ----------------------------------------------------------------------------- gpu_check.sh's table
def _read(path):
    return open(path).read() if os.path.exists(path) else ""


_ATTN_COLS = (7, 1, 12, 6, 9, 8, 9, 9, 10, 8, 9, 9)  # bench_attention.print_table's field widths


def attention_rows(text: str) -> list[tuple]:
    """bench_attention.py's table rows: (S, mode, impl, fwd ms, fwd eff TF, x causal fwd, x causal f+b).
    Sliced by its fixed column widths: a wide number may touch its neighbour."""
    rows = []
    for line in text.splitlines():
        f, at = [], 0
        for w in _ATTN_COLS:
            f.append(line[at:at + w].strip())
            at += w
        if not f[0].isdigit() or len(line) < at:
            continue
        try:
            rows.append((int(f[0]), f[2], f[3], float(f[4]), float(f[5]), float(f[7]), float(f[11])))
        except ValueError:
            continue
    return rows


def gpu_summary(d: str) -> list[str]:
    """One table from the logs gpu_check.sh left in d, with the issue's GPU targets."""
    rc = {n: _read(os.path.join(d, f"{n}.rc")).strip() or "not run" for n in ("pytest", "attention", "smoke", "search")}
    gpu = (_read(os.path.join(d, "gpu.txt")).strip().splitlines() or ["device unknown"])[0]
    lines = [f"GPU check on {gpu}",
             f"{'check':<50}{'measured':>22}  target"]
    tail = ([l for l in _read(os.path.join(d, "pytest.log")).splitlines() if l.strip()] or ["no output"])[-1]
    counts = " ".join(f"{n} {w}" for n, w in re.findall(r"(\d+) (passed|failed|errors?|skipped)", tail)) or tail[-22:]
    lines.append(f"{'pytest -m gpu (rc ' + rc['pytest'] + ')':<50}{counts:>22}  all pass")
    att = attention_rows(_read(os.path.join(d, "attention.log")))
    for impl in ("ours", "sdpa"):
        tf = [r[4] for r in att if r[0] == 16384 and r[1] == "causal" and r[2] == impl]
        lines.append(f"{'dense causal fwd TFLOP/s, 16k hd128, ' + impl:<50}"
                     f"{f'{tf[0]:.0f}' if tf else 'n/a':>22}  {'>= 450' if impl == 'ours' else ''}")
    for mode in ("window", "moba"):
        xs = [r for r in att if 65536 <= r[0] <= 131072 and r[1] == mode and r[2] == "ours"]
        val = f"{min(r[5] for r in xs):.1f}x / {min(r[6] for r in xs):.1f}x" if xs else "n/a"
        lines.append(f"{mode + ' vs dense, 64k-128k, min fwd / f+b (rc ' + rc['attention'] + ')':<50}{val:>22}  >= 6x")
    for name in ("smoke", "search"):
        js = _read(os.path.join(d, f"{name}.json"))
        if not js:
            lines.append(f"{name + ' (rc ' + rc[name] + ')':<50}{'no result':>22}")
            continue
        res = json.loads(js)
        rate = "tok_cpu_s" if res["args"]["device"] == "cpu" else "tok_s"  # as report() computes MFU
        for v, rows in res["points"].items():
            for S, r in rows if name == "smoke" else []:
                val = ("{:.0f} tok/s {:.1f}% MFU".format(r["tok_s"], 100 * r["flops_per_token"] * r[rate] /
                       res["peak_flops"]) if r["status"] == "ok" else r["status"])
                lines.append(f"{res['args']['dtype'] + f' train step, node shape {v}, S={S}':<50}{val:>22}")
        for v, f in res["search"].items():
            n = "none" if f["longest"] is None else (">=" if f["capped"] or f.get("partial") else "") + str(f["longest"])
            lines.append(f"{'longest trainable on one GPU, ' + v:<50}{n:>22}  >= 1048576")
    return lines


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    a = parse_args(argv)
    if a.point:
        try:
            r = run_point(json.loads(a.point))
        except torch.OutOfMemoryError:
            r = {"status": "oom", "note": "out of memory"}
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    if a.gpu_summary:
        print("\n".join(gpu_summary(a.gpu_summary)))
        return 0
    if a.report:
        print("\n".join(report_from_json(a.report)))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so run_capped kills the running try
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_vs_hf: --device cuda but no CUDA GPU found; use --device cpu", file=sys.stderr)
        return 1
    if a.device == "cuda":  # the cap is a fraction of the one device
        a.budget_gb = min(a.budget_gb, torch.cuda.get_device_properties(0).total_memory / GB)
    from moetrain.train.metrics import device_peak_flops
    peak = cpu_matmul_flops_per_cpu_s() if a.device == "cpu" else device_peak_flops(torch.device(a.device))
    res, found = {}, {}

    def log(line):  # progress, and the results so far (a run killed from outside keeps them)
        print(line, file=sys.stderr, flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"args": vars(a), "peak_flops": peak, "points": res, "search": found}, f, indent=1)
    t0 = time.time()
    sweep(a, log, res)
    if not a.no_search:
        search(a, res, log, found)
    print("\n".join(report(a, peak, res, found, time.time() - t0)))
    log(f"bench_vs_hf: done in {time.time() - t0:.0f} s")
    return 0


def report(a, peak: float, res: dict, found: dict, elapsed=None) -> list[str]:
    """The header, the points table, the search table and (built-in shape, CPU) the targets."""
    cpu = a.device == "cpu"
    m = train_config(a, "dense", a.device).model
    at = train_config(a, "sliding", a.device).model.attention
    lines = [f"bench_vs_hf on {a.device}, {a.dtype}, batch {a.batch}, AdamW, {a.warmup} warm-up + {a.steps} timed "
             f"step(s) per point, budget {a.budget_gb:g} GB per point" + (f", {elapsed:.0f} s in all" if elapsed else ""),
             f"shape: d={m.hidden_size} L={m.n_layers} E={m.moe.n_experts} top-{m.moe.top_k} F={m.moe.intermediate_size} "
             f"H={m.n_heads}/{m.n_kv_heads} V={m.vocab_size}; window {at.window}, moba {at.moba_topk}x{at.block_size}, "
             f"+mem = checkpoint full + MoE tiles of {a.tile_tokens} + LM head blocks of "
             f"{getattr(a, 'loss_chunk', 1024)} rows{' + offload' if not cpu else ' + release_host_memory (huge pages)'}",
             f"MFU peak: {peak / 1e12:.3f} TFLOP/s" + (" per CPU-second (fp32 1024^3 matmul); MFU from tok/cpu-s"
                                                      if cpu else " (bf16 spec sheet)")]
    lines += points_table(res, peak, "tok_cpu_s" if cpu else "tok_s")
    if found:
        lines += [""] + search_table(found, a.budget_gb)
    if cpu and a.config is None:
        lines += [""] + targets_table(a, res, found)
    return lines


def report_from_json(path: str) -> list[str]:
    """The same report from a --json file, also one a killed run left behind."""
    d = json.load(open(path))
    a = argparse.Namespace(**d["args"])
    res = {v: [tuple(x) for x in rows] for v, rows in d["points"].items()}
    found = {v: dict(f, tries=[tuple(t) for t in f["tries"]]) for v, f in d["search"].items()}
    return report(a, d["peak_flops"], res, found)


if __name__ == "__main__":
    sys.exit(main())
