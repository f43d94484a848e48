"""Workers for the multi-process expert-parallel tests (CPU, gloo).

Each worker asserts itself; a failure surfaces in the parent as the worker's
traceback. Kept out of test modules so spawned children import little.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from moetrain.config import config_from_dict

from dist_helpers import free_port, init, spawn  # noqa: F401 (tests/dist_helpers.py)

VOCAB, B, S = 61, 2, 6


def tiny_cfg(**moe):
    m = dict(n_experts=4, top_k=2, intermediate_size=16, aux_loss_coef=0.01, z_loss_coef=0.001)
    m.update(moe)
    model = dict(vocab_size=VOCAB, hidden_size=16, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=24,
                 max_position_embeddings=32, moe=m)
    return config_from_dict({"model": model, "stages": [{"seq_len": S, "steps": 4}],
                             "train": {"micro_batch_size": B}, "optim": {"lr": 1e-2, "warmup_steps": 0,
                                                                          "grad_clip": 0.0}})


def global_batch(world: int, step: int = 0):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (world * B, S), generator=g)


# --------------------------------------------------------------------------- plain torch EP
def _grads_ep(model, groups, world):
    """What DeepSpeed does: mean over all ranks; expert grads summed over EDP replicas only."""
    from moetrain.parallel.expert_parallel import is_expert_param
    for p in model.parameters():
        dist.all_reduce(p.grad, group=groups.edp_group if is_expert_param(p) else None)
        p.grad /= world


def _fixed_counts(inner, counts):
    """Reference stand-in for GlobalBatchCounts: the global-batch counts, precomputed."""
    from moetrain.model.moe import Dispatcher

    class FixedCounts(Dispatcher):
        def run_experts(self, *args):
            return inner.run_experts(*args)

        def reduce_counts(self, local):
            return counts

    return FixedCounts()


def _global_counts(ref, ids, world):
    with torch.no_grad():
        per_mb = [ref(ids[r * B:(r + 1) * B]).moe_stats for r in range(world)]
    return [sum(mb[i]["counts"] for mb in per_mb) for i in range(len(per_mb[0]))]


def _one_equivalence(rank: int, world: int, ep: int, moe_kw: dict) -> None:
    from moetrain.model import build_model
    from moetrain.model.moe import moe_layers
    from moetrain.parallel import ParallelDims, parallelize
    moe_kw = dict(moe_kw)
    ckpt = moe_kw.pop("activation_checkpointing", False)
    cfg = tiny_cfg(ep_size=ep, **moe_kw)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ref = copy.deepcopy(model)
    if ckpt:  # recompute (and re-dispatch) each block in backward
        cfg.memory.checkpoint = "full"
    par = parallelize(model, ParallelDims.from_config(cfg, world, rank), cfg, use_deepspeed=False)
    groups = par.ep_groups
    assert groups is None or (groups.ep_size, groups.ep_rank) == (par.dims.ep, par.dims.ep_rank)
    ids = global_batch(world)
    if cfg.model.moe.aux_loss_scope == "global_batch":  # parallelize summed the model's counts over ranks
        for layer, counts in zip(moe_layers(ref), _global_counts(ref, ids, world)):
            layer.set_dispatcher(_fixed_counts(layer.dispatcher, counts))
    # Reference: EP=1 data parallel over the same ranks = mean over all micro-batches, in one process.
    ref_losses = []
    for r in range(world):
        mb = ids[r * B:(r + 1) * B]
        out = ref(mb, labels=mb)
        (out.loss / world).backward()
        ref_losses.append(out.loss.detach())
    mb = ids[rank * B:(rank + 1) * B]
    out = model(mb, labels=mb)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), ref_losses[rank], rtol=1e-5, atol=1e-6, msg=f"loss {moe_kw}")
    _grads_ep(model, groups, world)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        if groups is not None and name.endswith(("gate_EFd", "up_EFd", "down_EdF")):
            El = g_ref.shape[0] // ep
            g_ref = g_ref[groups.ep_rank * El:(groups.ep_rank + 1) * El]
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-4, atol=1e-6, msg=f"grad of {name}, {moe_kw}")


def ep_equivalence(rank: int, world: int, cases: list) -> None:
    """For each (ep, moe overrides): EP forward/backward == EP=1 on every rank's
    micro-batch (losses and all gradients), in one process group."""
    init(rank, world)
    for ep, moe_kw in cases:
        _one_equivalence(rank, world, ep, moe_kw)
    dist.destroy_process_group()


# --------------------------------------------------------------------------- DeepSpeed EP
def _engine(cfg, world, seed=0):
    """(engine, Parallelism), as the trainer builds them."""
    from moetrain.model import build_model
    from moetrain.parallel import ParallelDims, parallelize
    from moetrain.parallel.engine import build_engine
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    par = parallelize(model, ParallelDims.from_config(cfg, world, dist.get_rank()), cfg)
    return build_engine(model, cfg, par, B, 1), par


def _step(engine, ids, rank):
    mb = ids[rank * B:(rank + 1) * B]
    out = engine(mb, labels=mb)
    engine.backward(out.loss)
    engine.step()
    return float(out.loss.detach())


def _full_experts(engine, par):
    """Every expert tensor, gathered over the EP group (a test-only helper)."""
    from moetrain.parallel.expert_parallel import is_expert_param
    ep, out = par.dims.ep, {}
    for name, p in engine.module.named_parameters():
        if ep > 1 and is_expert_param(p):
            parts = [torch.empty_like(p) for _ in range(ep)]
            dist.all_gather(parts, p.detach().contiguous(), group=par.ep_group)
            out[name] = torch.cat(parts)
        else:
            out[name] = p.detach().clone()
    return out


def _deepspeed_case(rank: int, world: int, ep: int, zero_stage: int, ckpt_root: str) -> None:
    from moetrain import checkpoint as ckpt
    cfg1, cfg_ep = tiny_cfg(), tiny_cfg(ep_size=ep)
    for c in (cfg1, cfg_ep):
        c.deepspeed.zero_stage = zero_stage
    (ref, par_ref), (eng, par) = _engine(cfg1, world), _engine(cfg_ep, world)
    for step in range(2):
        ids = global_batch(world, step)
        l_ref, l_ep = _step(ref, ids, rank), _step(eng, ids, rank)
        assert abs(l_ref - l_ep) < 1e-5, (zero_stage, step, l_ref, l_ep)
    p_ref, p_ep = _full_experts(ref, par_ref), _full_experts(eng, par)
    for name in p_ref:
        torch.testing.assert_close(p_ep[name], p_ref[name], rtol=1e-4, atol=1e-6, msg=f"{name} after 2 steps")
    path = ckpt.save(eng, ckpt_root, 2, {"world_size": world, "step": 2}, {}, rank, keep_last=2,
                     ep_groups=par.ep_groups)
    saved = _full_experts(eng, par)
    ids = global_batch(world, 2)
    after_one_more = (_step(eng, ids, rank), _full_experts(eng, par))
    fresh, par_fresh = _engine(cfg_ep, world, seed=1)  # different init: everything must come from the checkpoint
    ckpt.load(fresh, path, rank, world, ep_groups=par_fresh.ep_groups)
    restored = _full_experts(fresh, par_fresh)
    for name in saved:
        assert torch.equal(restored[name], saved[name]), f"ZeRO-{zero_stage}: {name} not restored exactly"
    loss = _step(fresh, ids, rank)
    assert loss == after_one_more[0], (zero_stage, loss, after_one_more[0])
    for name, t in _full_experts(fresh, par_fresh).items():  # same next step => same optimizer state
        assert torch.equal(t, after_one_more[1][name]), f"ZeRO-{zero_stage}: {name} differs a step after resume"
    if rank == 0:  # the exporter's view: every expert, gathered from the shards
        from moetrain.checkpoint import gather_expert_state_dict
        model_file = torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu",
                                weights_only=True)["module"]
        full = gather_expert_state_dict(model_file, path)
        for name, t in saved.items():
            assert torch.equal(full[name], t), f"export gather: {name}"
    dist.barrier()


def deepspeed_ep(rank: int, world: int, ep: int, zero_stages: list, ckpt_root: str) -> None:
    """For each ZeRO stage: an engine with EP=ep trains like EP=1 (losses, every
    parameter); checkpoint save -> load restores every expert tensor and its
    optimizer state exactly (the next step matches bit for bit)."""
    from moetrain.parallel.engine import init_distributed
    init(rank, world)
    init_distributed()
    for z in zero_stages:
        _deepspeed_case(rank, world, ep, z, os.path.join(ckpt_root, f"zero{z}"))
