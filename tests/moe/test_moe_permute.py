"""Triton permute / unpermute kernels against the PyTorch reference (interpreter on CPU)."""
import pytest
import torch

from moetrain.kernels import moe_permute
from moetrain.model.moe import apply_capacity, sort_by_expert


def _routing(T, E, K, capacity=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    w, experts = logits.softmax(-1).topk(K)
    if capacity is not None:
        experts = apply_capacity(w, experts, E, capacity)
    src, pos, counts = sort_by_expert(experts, E)
    return w, src, pos


def _run(backend, x, w, src, pos, g_out):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    xs = moe_permute.permute(x, src, pos, backend=backend)
    ys = xs * torch.linspace(0.5, 2.0, x.shape[1], dtype=x.dtype, device=x.device) + xs.pow(2)  # any row map
    out = moe_permute.unpermute(ys, src, pos, w, backend=backend)
    out.backward(g_out)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("T,E,K,d,capacity", [(1, 4, 1, 1, None), (13, 5, 3, 37, None), (29, 6, 2, 130, 4),
                                              (8, 3, 2, 16, 0)])
def test_triton_matches_reference_outputs_and_grads(T, E, K, d, capacity):
    w, src, pos = _routing(T, E, K, capacity, seed=T)
    x = torch.randn(T, d)
    g_out = torch.randn(T, d)
    ref = _run("reference", x, w, src, pos, g_out)
    for backend in ("torch", "triton"):
        out = _run(backend, x, w, src, pos, g_out)
        for name, a, b in zip(("out", "grad x", "grad w"), ref, out):
            err = (a - b).abs()
            assert err.max() <= 1e-5 * max(1.0, a.abs().max().item()), (backend, name, err.max().item(),
                                                                         err.mean().item())


def test_unweighted_unpermute_is_the_permute_adjoint():
    """sum_t <permute(x)_s, y_s> == <x, unpermute(y)> (gather and scatter-add are adjoint)."""
    w, src, pos = _routing(11, 4, 2, capacity=3)
    x, y = torch.randn(11, 7), torch.randn(src.numel(), 7)
    kept = (torch.arange(src.numel()) < (pos >= 0).sum())[:, None]  # rows of dropped slots are never read
    for backend in ("reference", "torch", "triton"):
        lhs = (moe_permute.permute(x, src, pos, backend=backend) * y * kept).sum()
        rhs = (x * moe_permute.unpermute(y, src, pos, None, backend=backend)).sum()
        assert torch.allclose(lhs, rhs, atol=1e-5)


def test_bad_backend_is_a_clear_error():
    w, src, pos = _routing(4, 2, 1)
    with pytest.raises(ValueError, match="not one of auto, torch, triton, reference"):
        moe_permute.permute(torch.randn(4, 3), src, pos, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_large(dtype):
    w, src, pos = _routing(4096, 64, 8, capacity=600)
    x = torch.randn(4096, 1024).cuda().to(dtype)
    g_out = torch.randn_like(x)
    src, pos, w = src.cuda(), pos.cuda(), w.cuda()
    ref = _run("reference", x, w, src, pos, g_out)
    tri = _run("triton", x, w, src, pos, g_out)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(ref, tri):
        assert (a.float() - b.float()).abs().max() <= tol * max(1.0, a.float().abs().max().item())
