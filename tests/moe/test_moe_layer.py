"""MoE layer: routers, grouped path == loop reference, dropless == capacity, losses."""
import math

import pytest
import torch

import moetrain.model.moe as moe_mod
from moetrain.config import config_from_dict
from moetrain.model.moe import (LocalDispatcher, MoE, apply_capacity, experts_grouped, experts_loop,
                                load_balancing_loss, sequence_balancing_loss, sequence_ids)

D = 32


def layer(seed=0, **moe) -> MoE:
    m = dict(n_experts=6, top_k=2, intermediate_size=24, aux_loss_coef=0.01, z_loss_coef=0.001)
    m.update(moe)
    cfg = config_from_dict({"model": dict(vocab_size=50, hidden_size=D, n_layers=2, n_heads=4, n_kv_heads=2,
                                          intermediate_size=40, moe=m)}).model
    torch.manual_seed(seed)
    mod = MoE(cfg)
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return mod


def run(mod: MoE, x, fn=None):
    """Output, aux loss and every gradient (input, router, experts, shared) of one forward/backward."""
    if fn is not None:
        mod.set_dispatcher(LocalDispatcher(fn))
    mod.zero_grad()
    x = x.detach().clone().requires_grad_()
    y, aux = mod(x)
    ((y * torch.linspace(-1, 1, D, device=y.device, dtype=y.dtype)).float().sum() + aux).backward()
    grads = {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}
    return y.detach(), aux.detach(), x.grad, grads


def assert_same(a, b, tol=1e-5):
    for u, v in zip(a[:3], b[:3]):
        torch.testing.assert_close(u, v, rtol=tol, atol=1e-6)
    assert a[3].keys() == b[3].keys()
    for n in a[3]:
        torch.testing.assert_close(a[3][n], b[3][n], rtol=tol, atol=1e-6, msg=n)


ROUTERS = [dict(), dict(softmax_before_topk=False), dict(norm_topk_prob=False),
           dict(router="sigmoid", routed_scaling_factor=2.5, n_groups=3, topk_groups=2),
           dict(n_shared_experts=2, shared_expert_gate=True), dict(capacity_factor=0.8),
           dict(seq_aux_loss_coef=0.1, capacity_factor=1.0, n_experts=8, top_k=3, intermediate_size=5)]


@pytest.mark.parametrize("moe", ROUTERS)
def test_grouped_equals_loop_reference_outputs_and_all_grads(moe):
    mod = layer(**moe)
    x = torch.randn(2, 19, D)
    assert_same(run(mod, x, experts_loop), run(mod, x, experts_grouped))


def test_segment_fallback_equals_grouped_mm(monkeypatch):
    mod = layer(capacity_factor=0.9)
    x = torch.randn(3, 11, D)
    fast = run(mod, x, experts_grouped)
    monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda *a: False)
    assert_same(fast, run(mod, x, experts_grouped))


@pytest.mark.parametrize("moe", [dict(), dict(router="sigmoid", n_groups=2, topk_groups=1)])
def test_dropless_equals_capacity_mode_with_room_for_everything(moe):
    x = torch.randn(2, 23, D)
    dropless = layer(**moe)
    roomy = layer(**moe, capacity_factor=6 / 2)  # capacity = every token
    assert_same(run(dropless, x), run(roomy, x))
    assert int(roomy.last_stats["dropped"]) == 0


def test_capacity_keeps_the_heaviest_assignments_and_reports_drops():
    g = torch.Generator().manual_seed(0)
    w, experts = torch.rand(40, 6, generator=g).softmax(-1).topk(2)
    kept = apply_capacity(w, experts, 6, capacity=5)
    for e in range(6):
        mine = experts == e
        n = int(mine.sum())
        assert int((kept == e).sum()) == min(n, 5)
        if n > 5:  # every kept weight >= every dropped weight of the same expert
            assert w[kept == e].min() >= w[mine & (kept < 0)].max()
    mod = layer(capacity_factor=0.5)
    mod(torch.randn(4, 10, D))
    cap = math.ceil(0.5 * 40 * 2 / 6)
    assert int(mod.last_stats["dropped"]) == int(mod.last_stats["counts"].clamp_min(cap).sub(cap).sum())


def test_router_weight_conventions():
    x = torch.randn(30, D)
    after = layer(softmax_before_topk=False).router(x)
    torch.testing.assert_close(after.weights_TK, after.logits_TE.gather(-1, after.experts_TK).softmax(-1))
    unnorm = layer(norm_topk_prob=False).router(x)
    torch.testing.assert_close(unnorm.weights_TK, unnorm.probs_TE.gather(-1, unnorm.experts_TK))
    sig = layer(router="sigmoid", routed_scaling_factor=2.5).router(x)
    s = sig.logits_TE.sigmoid().gather(-1, sig.experts_TK)
    torch.testing.assert_close(sig.weights_TK, 2.5 * s / s.sum(-1, keepdim=True))


def test_group_limited_routing_picks_only_from_the_best_groups():
    mod = layer(router="sigmoid", n_experts=8, top_k=3, n_groups=4, topk_groups=2)
    r = mod.router(torch.randn(64, D))
    scores = r.logits_TE.sigmoid().view(64, 4, 2)
    best = scores.topk(2, -1).values.sum(-1).topk(2, -1).indices  # top-2-sum group score (DeepSeek-V3)
    groups = r.experts_TK // 2
    assert all(set(groups[t].tolist()) <= set(best[t].tolist()) for t in range(64))


def test_router_jitter_only_in_training():
    mod = layer(router_jitter=0.5)
    x = torch.randn(64, D)
    mod.eval()
    assert torch.equal(mod.router(x).experts_TK, mod.router(x).experts_TK)
    mod.train()
    assert not torch.equal(mod.router(x).logits_TE, mod.router(x).logits_TE)


def test_expert_bias_is_persistent_and_steers_selection_not_weights():
    assert "router.expert_bias" not in layer().state_dict()
    mod = layer(bias_update_speed=0.01)
    assert "router.expert_bias" in mod.state_dict()
    x = torch.randn(50, D)
    mod.router.expert_bias[3] = 100.0  # everyone picks expert 3 ...
    r = mod.router(x)
    assert (r.experts_TK == 3).any(-1).all()
    plain = r.probs_TE.gather(-1, r.experts_TK)  # ... but combine weights stay the unbiased scores
    torch.testing.assert_close(r.weights_TK, plain / plain.sum(-1, keepdim=True))


def _rows(B, S):
    return sequence_ids(B, S, None, "cpu")


def test_balancing_losses_at_uniform_routing_and_with_global_counts():
    B, S, E, K = 2, 8, 4, 2
    probs = torch.full((B * S, E), 1 / E)
    experts = torch.arange(B * S * K).view(B * S, K) % E
    assert sequence_balancing_loss(probs, experts, _rows(B, S)).item() == pytest.approx(1.0)
    skew = torch.zeros_like(experts)
    skew[..., 1] = 1
    assert sequence_balancing_loss(probs, skew, _rows(B, S)).item() == pytest.approx(1.0)  # P uniform: f.P = 1/E
    p_skew = torch.zeros(B * S, E)
    p_skew[..., :2] = 0.5
    assert sequence_balancing_loss(p_skew, skew, _rows(B, S)).item() == pytest.approx(2.0)
    local = load_balancing_loss(probs, experts)
    counts = torch.tensor([100, 0, 0, 0])  # e.g. summed over ranks: expert 0 took everything
    assert load_balancing_loss(probs, experts, counts).item() == pytest.approx(local.item())
    assert load_balancing_loss(p_skew, experts, counts).item() == pytest.approx(2.0)


def test_sequence_loss_per_packed_document():
    """Packed documents count as the sequences: the packed loss is the mean of each
    document's own loss, and differs from treating the packed row as one sequence."""
    g = torch.Generator().manual_seed(0)
    E, K, lengths = 4, 2, [5, 11, 3]
    probs = torch.softmax(torch.randn(sum(lengths), E, generator=g), -1)
    experts = probs.topk(K, dim=-1).indices
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    seg = sequence_ids(1, 19, cu, "cpu")
    assert seg.tolist() == [0] * 5 + [1] * 11 + [2] * 3
    packed = sequence_balancing_loss(probs, experts, seg)
    alone = [sequence_balancing_loss(probs[a:b], experts[a:b], torch.zeros(b - a, dtype=torch.long))
             for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert packed.item() == pytest.approx(sum(a.item() for a in alone) / 3, rel=1e-6)
    whole_row = sequence_balancing_loss(probs, experts, torch.zeros(19, dtype=torch.long))
    assert abs(whole_row.item() - packed.item()) > 1e-3
    # the MoE layer uses the documents when given cu_seqlens
    mod = layer(seq_aux_loss_coef=1.0, aux_loss_coef=0.0, z_loss_coef=0.0)
    x = torch.randn(1, 19, D, generator=g)
    _, aux_docs = mod(x, cu)
    docs = mod.last_stats["seq_loss"]
    mod(x)
    row = mod.last_stats["seq_loss"]
    assert aux_docs.item() == pytest.approx(docs.item()) and docs.item() != pytest.approx(row.item())


def test_stats_for_health_metrics():
    mod = layer(capacity_factor=0.5, seq_aux_loss_coef=0.1)
    mod(torch.randn(2, 9, D))
    st = mod.last_stats
    assert int(st["counts"].sum()) == st["assignments"] == 2 * 9 * 2 and st["tokens"] == 18
    assert 0 < float(st["entropy"]) <= math.log(6) + 1e-6
    assert {"lb_loss", "z_loss", "seq_loss", "dropped"} <= st.keys()


@pytest.mark.gpu
@pytest.mark.parametrize("moe", [dict(n_experts=64, top_k=8, intermediate_size=128), dict(capacity_factor=1.0)])
def test_cuda_bf16_grouped_mm_and_triton_permute_match_loop(moe):
    """On CUDA the grouped path uses torch._grouped_mm (bf16) and the Triton permute kernels."""
    mod = layer(**moe).cuda().to(torch.bfloat16)
    x = torch.randn(4, 256, D, device="cuda", dtype=torch.bfloat16)
    ref, fast = run(mod, x, experts_loop), run(mod, x, experts_grouped)
    for a, b in zip(ref[:3], fast[:3]):
        assert (a.float() - b.float()).abs().max() <= 3e-2 * max(1.0, a.float().abs().max().item())
    for n in ref[3]:
        a, b = ref[3][n].float(), fast[3][n].float()
        assert (a - b).abs().max() <= 3e-2 * max(1.0, a.abs().max().item()), n
