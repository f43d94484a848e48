"""Workers for the sequence-parallel tests (CPU, gloo; spawned, each asserts itself).

The reference is the same model, unsharded, run on every rank on the whole batch;
the sequence-parallel copy sees only its shard. Gradients are compared after the
reduction DeepSpeed applies (sum over all ranks / world size).
"""
from __future__ import annotations

import copy
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

from moetrain.config import config_from_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, also when run as a script
from dist_helpers import free_port, init, spawn  # noqa: E402,F401 (tests/dist_helpers.py)

VOCAB = 61


# Attention patterns of the equivalence cases (each layer of the model gets the pattern).
PATTERNS = {
    "full": dict(layer_types=["full"]),
    "sliding_sinks": dict(layer_types=["sliding"], window=5, sink_tokens=2),
    "moba": dict(layer_types=["moba"], block_size=4, moba_topk=2, sink_tokens=1),
}


def model_cfg(pattern: str, n_kv: int, backend: str = "auto", hidden: int = 32, n_layers: int = 2, **moe):
    m = dict(n_experts=4, top_k=2, intermediate_size=16, aux_loss_coef=0.01, z_loss_coef=0.001,
             seq_aux_loss_coef=0.01, first_k_dense=1)
    m.update(moe)
    attn = dict(PATTERNS[pattern], backend=backend, full_attention_last_n=0)
    model = dict(vocab_size=VOCAB, hidden_size=hidden, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv,
                 intermediate_size=24, max_position_embeddings=256, moe=m, attention=attn)
    return config_from_dict({"model": model, "stages": [{"seq_len": 16, "steps": 1}]}).model


def make_batch(packed: bool, S: int = 16, B: int = 2, seed: int = 0) -> dict:
    """Window rows [B, S], or one packed row [1, S] of documents with positions restarting."""
    g = torch.Generator().manual_seed(seed)
    if not packed:
        ids = torch.randint(0, VOCAB, (B, S + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, 3] = -100  # a few ignored positions
        return {"input_ids": ids[:, :S], "labels": labels,
                "position_ids": torch.arange(S).expand(B, S).clone(), "cu_seqlens": None}
    cu = torch.tensor([0, 5, 11, S], dtype=torch.int32)  # documents cross the shard boundary at S/2
    ids = torch.randint(0, VOCAB, (1, S + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, cu[1:-1].long() - 1] = -100  # no target across a document boundary
    pos = torch.cat([torch.arange(int(b - a)) for a, b in zip(cu[:-1], cu[1:])])[None]
    return {"input_ids": ids[:, :S], "labels": labels, "position_ids": pos, "cu_seqlens": cu}


def _close(a, b, what, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def equivalence(rank: int, world: int, cases: list) -> None:
    """Loss, logits, router stats and every gradient of the sharded model equal the unsharded one."""
    from moetrain.model import build_model
    from moetrain.parallel.memory import apply_checkpointing
    from moetrain.parallel.sequence import apply_sequence_parallel, shard_batch
    init(rank, world)
    for pattern, n_kv, packed, extra in cases:
        extra = dict(extra)
        recompute = extra.pop("checkpoint", None)  # activation checkpointing on top (memory tools)
        torch.manual_seed(0)
        ref = build_model(model_cfg(pattern, n_kv, **extra)).float()
        model = copy.deepcopy(ref)
        batch = make_batch(packed)
        out_ref = ref(**batch)
        out_ref.loss.backward()
        shard = apply_sequence_parallel(model, world)
        if recompute:
            apply_checkpointing(model, recompute)
        assert (shard.rank, shard.size) == (rank, world)
        local = shard_batch(batch, rank, world)
        out = model(**local)
        out.loss.backward()
        tag = f"{pattern} kv={n_kv} packed={packed} {extra}"
        for k in ("loss", "lm_loss", "aux_loss"):
            _close(getattr(out, k), getattr(out_ref, k), f"{tag} {k}")
        for s, s_ref in zip(out.moe_stats, out_ref.moe_stats):
            assert torch.equal(s["counts"], s_ref["counts"]), tag
            for k in ("lb_loss", "z_loss", "seq_loss", "entropy", "dropped", "tokens", "assignments"):
                _close(torch.as_tensor(s[k]).double(), torch.as_tensor(s_ref[k]).double(), f"{tag} stat {k}")
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)  # what DeepSpeed does: mean over all ranks
            _close(g / world, p_ref.grad, f"{tag} grad {name}")
        with torch.no_grad():  # logits of this rank's shard = the reference's columns
            logits = model(local["input_ids"], position_ids=local["position_ids"],
                           cu_seqlens=local["cu_seqlens"]).logits
            ref_logits = ref(batch["input_ids"], position_ids=batch["position_ids"],
                             cu_seqlens=batch["cu_seqlens"]).logits
            n = batch["input_ids"].shape[1] // world
            _close(logits, ref_logits[:, rank * n:(rank + 1) * n], f"{tag} logits")
    dist.barrier()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_rss(rank: int, world: int, seq_len: int, out_dir: str) -> None:
    """One training forward + backward of a small MoE (d=256, 4 layers, sliding + full attention)
    at seq_len, sharded over `world` ranks; writes this rank's RSS before the step, its peak RSS
    (MiB) and the step's wall time. world=1 runs in this process without a process group."""
    from moetrain.model import build_model
    from moetrain.parallel.sequence import apply_sequence_parallel, shard_batch
    import deepspeed  # noqa: F401  (both sizes pay the same import)
    if world > 1:
        init(rank, world)
    torch.manual_seed(0)
    cfg = model_cfg("sliding_sinks", 2, hidden=256, n_layers=4, intermediate_size=128)
    cfg.intermediate_size, cfg.attention.window = 512, 1024
    cfg.attention.layer_types = ["sliding", "full"]
    model = build_model(cfg).float()
    if world > 1:
        apply_sequence_parallel(model, world)
    batch = shard_batch(make_batch(False, S=seq_len, B=1), rank, world)
    before = _rss_mib()
    t = time.perf_counter()
    model(**batch).loss.backward()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(out_dir, f"rss_S{seq_len}_sp{world}_rank{rank}.txt"), "w") as f:
        f.write(f"{before:.0f} {peak:.0f} {dt:.1f}\n")
    if world > 1:
        dist.barrier()


if __name__ == "__main__":  # python tests/parallel/sp_workers.py SEQ_LEN SP OUT_DIR: the memory numbers
    import sys
    S, sp, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.makedirs(out, exist_ok=True)
    if sp == 1:
        torch.set_num_threads(1)
        peak_rss(0, 1, S, out)
    else:
        spawn(peak_rss, sp, S, out)
