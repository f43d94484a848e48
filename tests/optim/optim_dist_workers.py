"""Muon under expert parallelism, 2 gloo processes (reuses the MoE EP workers' helpers)."""
from __future__ import annotations

import torch
from moe_dist_workers import _engine, _full_experts, _step, global_batch, init, tiny_cfg


def muon_ep_matches_ep1(rank: int, world: int, ep: int) -> None:
    """Three Muon steps at EP=ep equal EP=1 in losses and every parameter: each rank
    orthogonalises its own experts, which is exact since experts are separate matrices."""
    from moetrain.parallel.engine import init_distributed
    init(rank, world)
    init_distributed()
    cfg1, cfg_ep = tiny_cfg(), tiny_cfg(ep_size=ep)
    for c in (cfg1, cfg_ep):
        c.optim.name = "muon"
    (ref, par_ref), (eng, par) = _engine(cfg1, world), _engine(cfg_ep, world)
    assert type(eng.optimizer).__name__ == "MoonlightMuon", type(eng.optimizer)
    for step in range(3):
        ids = global_batch(world, step)
        l_ref, l_ep = _step(ref, ids, rank), _step(eng, ids, rank)
        assert abs(l_ref - l_ep) < 1e-5, (step, l_ref, l_ep)
    p_ref, p_ep = _full_experts(ref, par_ref), _full_experts(eng, par)
    moved = 0
    for name in p_ref:
        torch.testing.assert_close(p_ep[name], p_ref[name], rtol=1e-4, atol=1e-5, msg=f"{name} after 3 steps")
        moved += "experts" in name
    assert moved > 0
    torch.distributed.destroy_process_group()


def muon_zero_matches_zero0(rank: int, world: int, ep: int, ckpt_root: str) -> None:
    """Muon at ZeRO-1 and ZeRO-2 (flat partitions, each matrix gathered for Newton-Schulz,
    moetrain/optim/muon_zero.py) trains like ZeRO-0 under EP=ep: losses and every parameter
    after 3 steps; a save -> load into a differently seeded engine continues bit for bit."""
    import os
    from moetrain import checkpoint as ckpt
    from moetrain.parallel.engine import init_distributed
    # as a launcher starts a rank: init_distributed then brings up torch.distributed through
    # DeepSpeed (its EP groups need DeepSpeed's comm, which a bare init_process_group skips)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed()
    cfgs = {}
    for z in (0, 1, 2):
        cfgs[z] = tiny_cfg(ep_size=ep)
        cfgs[z].optim.name, cfgs[z].deepspeed.zero_stage = "muon", z
    ref, par_ref = _engine(cfgs[0], world)
    runs = {z: _engine(cfgs[z], world) for z in (1, 2)}
    for z, (eng, _) in runs.items():
        assert eng.zero_optimization_stage() == z and type(eng.optimizer.optimizer).__name__ == "MoonlightMuon"
        assert eng.optimizer.optimizer.zero_layouts, "no flat layouts attached"
    for step in range(3):
        ids = global_batch(world, step)
        l_ref = _step(ref, ids, rank)
        for z, (eng, _) in runs.items():
            l_z = _step(eng, ids, rank)
            assert abs(l_z - l_ref) < 1e-5, (z, step, l_z, l_ref)
    p_ref = _full_experts(ref, par_ref)
    for z, (eng, par) in runs.items():
        p_z = _full_experts(eng, par)
        for name in p_ref:
            torch.testing.assert_close(p_z[name], p_ref[name], rtol=1e-4, atol=1e-5, msg=f"ZeRO-{z} {name}")
        path = ckpt.save(eng, os.path.join(ckpt_root, f"zero{z}"), 3, {"world_size": world, "step": 3}, {}, rank,
                         keep_last=1, ep_groups=par.ep_groups)
        ids = global_batch(world, 3)
        after = (_step(eng, ids, rank), _full_experts(eng, par))
        fresh, par_fresh = _engine(cfgs[z], world, seed=1)
        ckpt.load(fresh, path, rank, world, ep_groups=par_fresh.ep_groups)
        assert _step(fresh, ids, rank) == after[0], f"ZeRO-{z}: loss a step after resume"
        for name, t in _full_experts(fresh, par_fresh).items():  # the momentum came back exactly
            assert torch.equal(t, after[1][name]), f"ZeRO-{z}: {name} differs a step after resume"
