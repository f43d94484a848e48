"""Muon (Moonlight recipe): Newton-Schulz band per expert, update RMS, a plain
reference, parameter groups, the ZeRO-3 refusal; the WSD schedule."""
import math

import pytest
import torch

from moetrain.config import config_from_dict, load_config
from moetrain.config.validate import validate
from moetrain.model import build_model
from moetrain.optim import MoonlightMuon, muon_param_groups, muon_scale, newton_schulz
from moetrain.train.schedule import lr_at, plan_stages

# What 5 quintic steps promise for singular values of the Frobenius-normalised input
# that are not tiny (condition number <= 100 here): measured [0.682, 1.203] over the
# shapes below; the iteration's fixed band is about [0.68, 1.2] (it oscillates there
# instead of converging to 1, by design of the coefficients).
BAND = (0.68, 1.21)


def _with_spectrum(shape, cond, seed):
    g = torch.Generator().manual_seed(seed)
    U, _, V = torch.linalg.svd(torch.randn(shape, generator=g), full_matrices=False)
    k = min(shape[-2:])
    S = torch.logspace(0, -math.log10(cond), k).expand(*shape[:-2], k)
    return U @ torch.diag_embed(S) @ V


@pytest.mark.parametrize("shape", [(8, 64, 32), (4, 33, 77), (3, 128, 128), (2, 256, 64)])
@pytest.mark.parametrize("cond", [1.0, 10.0, 100.0])
def test_newton_schulz_singular_values_in_band(shape, cond):
    X = newton_schulz(_with_spectrum(shape, cond, seed=shape[1]))
    s = torch.linalg.svdvals(X)
    assert s.min() >= BAND[0] and s.max() <= BAND[1], (s.min().item(), s.max().item())


def test_each_expert_orthogonalised_as_its_own_matrix():
    """Experts of wildly different scale: normalising the stack jointly would crush
    the small ones to ~0; per-expert normalisation puts every one in the band."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(4, 48, 24, generator=g) * torch.tensor([1e-3, 1.0, 10.0, 1e3]).view(4, 1, 1)
    X = newton_schulz(G)
    for e in range(4):
        s = torch.linalg.svdvals(X[e])
        assert s.min() >= BAND[0] and s.max() <= BAND[1], (e, s.min().item(), s.max().item())
        torch.testing.assert_close(X[e], newton_schulz(G[e]), rtol=0, atol=1e-6)


def _reference_step(p, grad, buf, lr, wd, mu):
    """Moonlight Muon for one matrix, written out plainly (Keller Jordan's loop)."""
    buf = mu * buf + grad
    u = grad + mu * buf
    X = u.clone() if u.shape[0] <= u.shape[1] else u.T.clone()
    X = X / (X.norm() + 1e-7)
    for _ in range(5):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    if u.shape[0] > u.shape[1]:
        X = X.T
    update = X * 0.2 * math.sqrt(max(u.shape))
    return p * (1 - lr * wd) - lr * update, buf


def test_matches_plain_reference_over_steps():
    torch.manual_seed(0)
    w2, w3 = torch.randn(40, 24), torch.randn(3, 16, 36)
    p2, p3 = torch.nn.Parameter(w2.clone()), torch.nn.Parameter(w3.clone())
    opt = MoonlightMuon([{"params": [p2, p3], "use_muon": True}], lr=0.02, weight_decay=0.1, momentum=0.95)
    ref2, ref3 = w2.clone(), w3.clone()
    b2, b3 = torch.zeros_like(w2), torch.zeros_like(w3)
    for step in range(4):
        g2, g3 = torch.randn(40, 24), torch.randn(3, 16, 36)
        p2.grad, p3.grad = g2.clone(), g3.clone()
        opt.step()
        ref2, b2 = _reference_step(ref2, g2, b2, 0.02, 0.1, 0.95)
        out = [_reference_step(ref3[e], g3[e], b3[e], 0.02, 0.1, 0.95) for e in range(3)]
        ref3, b3 = torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
        torch.testing.assert_close(p2.detach(), ref2, rtol=1e-5, atol=1e-5, msg=f"2-D, step {step}")
        torch.testing.assert_close(p3.detach(), ref3, rtol=1e-5, atol=1e-5, msg=f"experts, step {step}")


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(1)
    w = torch.randn(7, 5)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = MoonlightMuon([{"params": [a], "use_muon": False}], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(5):
        g = torch.randn(7, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (8, 96, 40)])
def test_update_rms_matches_moonlight_target(shape):
    """RMS of the applied update = 0.2 x sqrt(max(r, c)) x lr x RMS(orthogonal r x c),
    i.e. 0.2 x lr up to the NS band; measured against the exact target per matrix."""
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(shape))
    before, lr = p.detach().clone(), 1e-2
    opt = MoonlightMuon([{"params": [p], "use_muon": True}], lr=lr, weight_decay=0.0)
    p.grad = torch.randn(shape)
    opt.step()
    rms = (p.detach() - before).pow(2).mean(dim=(-2, -1)).sqrt()
    assert muon_scale(torch.Size(shape)) == pytest.approx(0.2 * math.sqrt(max(shape[-2:])))
    # Gaussian gradients: singular values land in the NS band, so RMS within it of 0.2 x lr.
    assert torch.all(rms >= BAND[0] * 0.2 * lr) and torch.all(rms <= BAND[1] * 0.2 * lr), rms
    assert torch.allclose(rms, torch.full_like(rms, 0.2 * lr), rtol=0.2), rms


def test_param_groups_route_embeddings_norms_router_head_to_adamw():
    cfg = load_config("configs/default.yaml", ["model.moe.first_k_dense=1"])  # a dense layer 0 too
    model = build_model(cfg.model)
    groups = muon_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    assert muon | adam == set(names.values()) and not muon & adam
    for n in adam:
        assert n.startswith(("embed", "lm_head")) or ".router." in n or n.endswith("norm.weight"), n
    for n in ("embed.weight", "lm_head.weight", "norm.weight", "layers.1.mlp.router.gate.weight",
              "layers.0.attn_norm.weight"):
        assert n in adam, n
    for n in ("layers.0.attn.q_proj.weight", "layers.0.mlp.gate_proj.weight", "layers.1.mlp.experts.gate_EFd",
              "layers.1.mlp.experts.down_EdF"):
        assert n in muon, n
    no_decay = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert all(p.dim() == 1 for p in no_decay) and no_decay


def test_vectors_refused_in_muon_group():
    with pytest.raises(ValueError, match="use_muon=False"):
        MoonlightMuon([{"params": [torch.nn.Parameter(torch.ones(4))], "use_muon": True}])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_0_to_2_accepted(stage):
    validate(config_from_dict({"optim": {"name": "muon"}, "deepspeed": {"zero_stage": stage}}))


def test_zero3_refused_clearly():
    with pytest.raises(ValueError, match="set deepspeed.zero_stage to 0, 1 or 2"):
        validate(config_from_dict({"optim": {"name": "muon"}, "deepspeed": {"zero_stage": 3}}))


# --------------------------------------------------------------------------- WSD
def _plan(steps=100, warm=10, lr=1.0):
    cfg = config_from_dict({"stages": [{"seq_len": 16, "steps": steps, "warmup_steps": warm, "lr": lr}]})
    return plan_stages(cfg)[0]


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_boundaries(shape):
    plan, lo = _plan(), 0.1
    lr = [lr_at(i, plan, "wsd", lo, 0.2, shape) for i in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)   # warmup 1/10 .. 10/10
    assert all(x == 1.0 for x in lr[10:80])                                 # plateau up to the decay start
    assert lr[80] < 1.0 and lr[99] == pytest.approx(lo)                     # the last 20 steps decay to min
    assert all(a > b for a, b in zip(lr[79:], lr[80:]))                     # strictly decreasing
    mid = lr[89]  # half-way through the decay (frac = 10/20)
    assert mid == pytest.approx(lo + (1 - lo) * (0.5 if shape == "linear" else 1 - math.sqrt(0.5)))


def test_wsd_rewarms_each_stage_and_never_decays_inside_warmup():
    cfg = config_from_dict({"optim": {"schedule": "wsd", "decay_fraction": 0.5, "warmup_steps": 4},
                            "stages": [{"seq_len": 16, "steps": 10}, {"seq_len": 32, "steps": 6, "warmup_steps": 5}]})
    p0, p1 = plan_stages(cfg)
    o = cfg.optim
    s0 = [lr_at(i, p0, o.schedule, o.min_lr_ratio, o.decay_fraction, o.decay_shape) for i in range(10)]
    s1 = [lr_at(i, p1, o.schedule, o.min_lr_ratio, o.decay_fraction, o.decay_shape) for i in range(6)]
    assert s0[:4] == pytest.approx([o.lr * k / 4 for k in (1, 2, 3, 4)]) and s0[4] == o.lr
    assert s0[-1] == pytest.approx(o.lr * o.min_lr_ratio)
    # Stage 2 re-warms from low; its decay (last 3 steps) would start inside warmup: it starts after it.
    assert s1[:5] == pytest.approx([o.lr * k / 5 for k in range(1, 6)])
    assert s1[5] == pytest.approx(o.lr * o.min_lr_ratio)


def test_wsd_keys_validated():
    with pytest.raises(ValueError, match="decay_fraction"):
        validate(config_from_dict({"optim": {"schedule": "wsd", "decay_fraction": 0.0}}))
    with pytest.raises(ValueError, match="decay_shape"):
        validate(config_from_dict({"optim": {"decay_shape": "cosine"}}))
