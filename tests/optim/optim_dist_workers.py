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
