import copy

import pytest
import torch

from moetrain.config import ModelConfig, config_from_dict
from moetrain.model import build_model
from moetrain.model.loss import chunked_cross_entropy, plain_cross_entropy
from moetrain.model.moe import (MoE, SwiGLU, experts_grouped, experts_loop, load_balancing_loss)
from moetrain.parallel.memory import apply_checkpointing


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                max_position_embeddings=64, moe=dict(n_experts=4, top_k=2, intermediate_size=24))
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return config_from_dict({"model": base}).model


def test_one_expert_top1_equals_dense_swiglu():
    torch.manual_seed(0)
    cfg = tiny(moe=dict(n_experts=1, top_k=1, intermediate_size=48))
    moe, dense = MoE(cfg), SwiGLU(32, 48)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(moe.experts.gate_EFd[0])
        dense.up_proj.weight.copy_(moe.experts.up_EFd[0])
        dense.down_proj.weight.copy_(moe.experts.down_EdF[0])
    x = torch.randn(3, 7, 32)
    y, _ = moe(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-6, atol=1e-6)


def test_aux_loss_minimum_under_uniform_routing():
    T, E, K = 64, 8, 2
    probs = torch.full((T, E), 1.0 / E)
    experts = torch.arange(T * K).reshape(T, K) % E  # every expert gets the same number of slots
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.zeros(T, K, dtype=torch.long)
    skewed[:, 1] = 1
    p2 = torch.zeros(T, E)
    p2[:, :2] = 0.5
    assert load_balancing_loss(p2, skewed).item() > 1.0 + 1.0


def test_topk_weights_sum_to_one_when_normalised():
    torch.manual_seed(0)
    cfg = tiny(moe=dict(n_experts=6, top_k=3))
    moe = MoE(cfg)
    r = moe.router(torch.randn(50, 32))
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(50))
    assert (r.experts_TK < 6).all() and r.experts_TK.shape == (50, 3)


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (37, 5, 2), (130, 8, 3)])
def test_grouped_equals_loop_reference(T, E, K):
    torch.manual_seed(T)
    moe = MoE(tiny(moe=dict(n_experts=E, top_k=K)))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(T, 32, requires_grad=True)
    outs = []
    for mod, inp, fn in ((moe, x, experts_loop), (moe, x, experts_grouped),
                         (copy.deepcopy(moe).double(), x.detach().double().requires_grad_(), experts_loop)):
        mod.zero_grad()
        inp.grad = None
        r = mod.router(inp)
        y = fn(mod.experts, inp, r.weights_TK, r.experts_TK)
        (y * torch.linspace(-1, 1, 32, dtype=y.dtype)).sum().backward()
        outs.append((y.detach(), inp.grad.clone(), [p.grad.clone() for p in mod.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)
    # Parameter gradients sum over all T*K assignments, and the two paths run different fp32
    # GEMM kernels (torch._grouped_mm vs per-expert matmuls), whose rounding differs by CPU:
    # measured against a float64 run of the reference, the grouped path must be as accurate
    # as the fp32 reference itself (the criterion of FlashAttention's tests), or within 1e-6.
    for loop, grouped, exact in zip(outs[0][2], outs[1][2], outs[2][2]):
        err_loop = (loop.double() - exact).abs().max().item()
        err_grouped = (grouped.double() - exact).abs().max().item()
        assert err_grouped <= max(2 * err_loop, 1e-6), (err_grouped, err_loop)


@pytest.mark.parametrize("T,chunk", [(1, 4), (100, 7), (257, 64), (64, 1024)])
def test_chunked_loss_equals_plain(T, chunk):
    torch.manual_seed(T)
    h = torch.randn(T, 24, dtype=torch.float32, requires_grad=True)
    w = torch.randn(101, 24, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 101, (T,))
    labels[::5] = -100
    labels[0] = 3
    a = chunked_cross_entropy(h, w, labels, chunk)
    ga = torch.autograd.grad(2.5 * a, (h, w))
    b = plain_cross_entropy(h, w, labels)
    gb = torch.autograd.grad(2.5 * b, (h, w))
    assert abs(a.item() - b.item()) <= 1e-6 * max(1.0, abs(b.item()))
    for x, y in zip(ga, gb):  # 1e-6 relative to the gradient's scale (fp32 eps is 1.2e-7)
        assert (x - y).abs().max().item() <= 1e-6 * max(1.0, y.abs().max().item())


def test_model_never_materialises_logits_when_training():
    torch.manual_seed(0)
    model = build_model(tiny())
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.requires_grad
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    # The same loss from materialised logits.
    logits = model(ids).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids.reshape(-1))
    assert abs(ref.item() - out.lm_loss.item()) < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_packed_documents_equal_separate_forwards(backend):
    """cu_seqlens + per-document positions == running each document alone."""
    torch.manual_seed(0)
    model = build_model(tiny(attention=dict(backend=backend))).eval()
    lens = [5, 11, 8]
    docs = [torch.randint(0, 97, (1, n)) for n in lens]
    packed = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)
    with torch.no_grad():
        together = model(packed, position_ids=pos, cu_seqlens=cu).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = build_model(tiny())
    b = copy.deepcopy(a)
    apply_checkpointing(b)  # moetrain.parallel.memory, as parallelize applies it
    ids = torch.randint(0, 97, (2, 12))
    for m in (a, b):
        m.train()
        m(ids, labels=ids).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_dense_layers_and_param_counts():
    cfg = tiny(n_layers=3, moe=dict(first_k_dense=1))
    m = build_model(cfg)
    assert [layer.is_moe for layer in m.layers] == [False, True, True]
    c = m.param_counts()
    expert = sum(p.numel() for layer in m.layers[1:] for p in layer.mlp.experts.parameters())
    assert c["total"] - c["active"] == expert // 2  # top-2 of 4 experts active


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_backward_equals_autograd_and_saves_no_normalised_copy(dtype):
    """RMSNorm's written-out backward: output bit-equal, gradients equal to autograd through
    the plain expression; what it keeps for backward is x, the weight and 1/rms per row."""
    from moetrain.model.norm import RMSNorm
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(19, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(19, generator=g))
    x = torch.randn(3, 7, 19, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(3, 7, 19, generator=g).to(dtype)

    def plain(x, w):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = norm(x)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), gy)
    y0 = plain(x, norm.weight)
    gx0, gw0 = torch.autograd.grad(y0, (x, norm.weight), gy)
    assert torch.equal(y, y0) and gx.dtype == dtype and gw.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx0, **tol)
    torch.testing.assert_close(gw, gw0, **tol)
    assert sorted(saved) == [19, 3 * 7, 3 * 7 * 19]  # weight, 1/rms per row, x
    with torch.no_grad():
        assert torch.equal(norm(x), y0)
