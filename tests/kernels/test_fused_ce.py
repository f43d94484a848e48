"""Fused linear cross-entropy (moetrain.kernels.fused_ce): the Triton path against the reference
and moetrain's chunked loss, loss and both gradients, on odd shapes (N, D, V off the tile sizes,
ragged chunks, ignored tokens, all tokens ignored). CPU runs use TRITON_INTERPRET=1 (conftest).

Tolerances, relative to the largest magnitude of the expected tensor: fp32 inputs at 2e-6 (fp32 eps
is 1.2e-7; sums over ~100 terms in another order), and against a float64 run of the reference the
fused path must be as accurate as the chunked one (within 2x, the criterion of FlashAttention's
tests); bf16 inputs at 2**-6: four roundings of half a bf16 ulp (2**-9 relative) separate the
paths (the fused one rounds the logits gradient, the GEMM output and the scaled gradient; the
chunked one its fp32 result once). Measured on CPU: within one ulp (max 0.6% of the scale).
"""
import pytest
import torch

from moetrain.config import ConfigError, load_config
from moetrain.kernels.fused_ce import fused_linear_cross_entropy as fused
from moetrain.kernels.fused_ce import op, triton_ce
from moetrain.kernels.fused_ce.reference import fused_linear_cross_entropy as reference
from moetrain.model.loss import chunked_cross_entropy, linear_cross_entropy

BF16_TOL = 2 ** -6


def errors(actual, expected):
    """(max abs error, mean abs error, scale = max |expected| or 1 when it is all zeros)."""
    if not expected.numel():
        return 0.0, 0.0, 1.0
    diff = (actual.double() - expected.double()).abs()
    return diff.max().item(), diff.mean().item(), expected.double().abs().max().item() or 1.0


def check(name, actual, expected, tol, same_dtype=True):
    """max |actual - expected| <= tol * max |expected|, with max and mean error in the message."""
    mx, mean, scale = errors(actual, expected)
    print(f"{name}: max {mx:.2e} mean {mean:.2e} (scale {scale:.2e})")
    assert actual.shape == expected.shape and (actual.dtype == expected.dtype or not same_dtype), \
        f"{name}: {actual.shape}/{actual.dtype} vs {expected.shape}/{expected.dtype}"
    assert mx <= tol * scale, f"{name}: max err {mx:.3e}, mean err {mean:.3e} > {tol:.1e} x scale {scale:.3e}"


def check_as_accurate(name, fused_out, chunked_out, exact):
    """Against the float64 truth the fused result errs at most 2x the chunked one (or 1e-6 x scale)."""
    f_max, f_mean, scale = errors(fused_out, exact)
    c_max, c_mean, _ = errors(chunked_out, exact)
    assert f_max <= max(2 * c_max, 1e-6 * scale), \
        f"{name} vs fp64: fused max {f_max:.3e} mean {f_mean:.3e}; chunked max {c_max:.3e} mean {c_mean:.3e}"


def loss_and_grads(fn, h, w, labels, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, labels, **kw)
    gh, gw = torch.autograd.grad(1.7 * loss, (h, w))  # grad_output != 1 exercises the backward scaling
    return loss.detach(), gh, gw


def make(N, D, V, seed, dtype=torch.float32, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) / D ** 0.25).to(dtype)  # logits of std ~D**0.25: a peaked softmax
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return h, w, labels


# (N, D, V, chunk, ignore_every): interpreter vocab tile is 32, so V = 7 / 33 / 101 cover a
# single partial tile, one extra column and a ragged fourth tile; chunks leave ragged tails.
SHAPES = [(1, 5, 7, 4, 0), (37, 19, 101, 8, 4), (64, 24, 33, 64, 3), (29, 16, 65, 100, 2)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N,D,V,chunk,ignore_every", SHAPES)
def test_matches_reference_and_chunked(N, D, V, chunk, ignore_every, reduction):
    h, w, labels = make(N, D, V, seed=N + V, ignore_every=ignore_every)
    got = loss_and_grads(fused, h, w, labels, chunk_size=chunk, reduction=reduction)
    want = loss_and_grads(reference, h, w, labels, reduction=reduction)
    chunked = loss_and_grads(lambda *a, **k: chunked_cross_entropy(*a, chunk, **k), h, w, labels,
                             reduction=reduction)
    exact = loss_and_grads(reference, h.double(), w.double(), labels, reduction=reduction)
    for i, name in enumerate(("loss", "dh", "dw")):
        check(f"{name} vs ref", got[i], want[i], 2e-6)
        check(f"{name} vs chunked", got[i], chunked[i], 2e-6)
        check_as_accurate(name, got[i], chunked[i], exact[i])


def test_all_tokens_ignored_gives_zero_loss_and_gradients():
    h, w, labels = make(13, 9, 40, seed=1)
    labels[:] = -100
    for reduction in ("mean", "sum"):
        loss, gh, gw = loss_and_grads(fused, h, w, labels, chunk_size=5, reduction=reduction)
        assert loss.item() == 0.0 and not gh.any() and not gw.any(), reduction
        ref = loss_and_grads(chunked_cross_entropy, h, w, labels, reduction=reduction)
        assert ref[0].item() == 0.0 and not ref[1].any() and not ref[2].any(), reduction


def test_custom_ignore_index_and_empty_input():
    h, w, labels = make(21, 8, 50, seed=2)
    labels[::3] = 7  # token id 7 plays the padding id
    got = loss_and_grads(fused, h, w, labels, chunk_size=6, ignore_index=7)
    want = loss_and_grads(reference, h, w, labels, ignore_index=7)
    for name, a, b in zip(("loss", "dh", "dw"), got, want):
        check(name, a, b, 2e-6)
    loss, gh, gw = loss_and_grads(fused, h[:0], w, labels[:0])
    assert loss.item() == 0.0 and gh.shape == (0, 8) and not gw.any()


def test_bf16_inputs_match_the_fp32_chunked_path():
    """bf16 h and w (the GPU case, here on the interpreter): fp32 softmax and dw accumulation."""
    h, w, labels = make(45, 24, 77, seed=3, dtype=torch.bfloat16, ignore_every=5)
    got = loss_and_grads(fused, h, w, labels, chunk_size=16)
    want = loss_and_grads(chunked_cross_entropy, h, w, labels, chunk=16)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for name, a, b in zip(("loss", "dh", "dw"), got, want):
        check(name, a, b, BF16_TOL)
    # A sum over many tokens comes back in fp32 on every path (bf16 would keep ~3 digits of it).
    sums = [fn(h, w, labels, reduction="sum") for fn in (fused, chunked_cross_entropy, reference)]
    assert [s.dtype for s in sums] == [torch.float32] * 3
    check("sum vs chunked", sums[0], sums[1], BF16_TOL)


def test_only_requested_gradients_are_computed(monkeypatch):
    h, w, labels = make(10, 8, 30, seed=4)
    seen = []
    real = op.linear_ce_chunks
    monkeypatch.setattr(op, "linear_ce_chunks", lambda *a: seen.append(a[-2:]) or real(*a))
    with torch.no_grad():
        evaluated = fused(h, w.requires_grad_(), labels)
    h_frozen = fused(h, w, labels)  # only the head weight wants a gradient
    (gw,) = torch.autograd.grad(h_frozen, (w,))
    assert seen == [(False, False), (False, True)]
    check("eval loss", evaluated, reference(h, w, labels), 2e-6)
    check("dw", gw, loss_and_grads(reference, h, w, labels)[2] / 1.7, 2e-6)


def test_bad_arguments_raise_clear_errors():
    h, w, labels = make(4, 8, 30, seed=5)
    with pytest.raises(ValueError, match="reduction='avg'"):
        fused(h, w, labels, reduction="avg")
    with pytest.raises(ValueError, match="shape mismatch"):
        fused(h, w[:, :5], labels)
    with pytest.raises(ValueError, match="chunk_size=0"):
        fused(h, w, labels, chunk_size=0)
    labels[1] = 30  # out of the vocab: caught on the device before the kernel reads past the row
    with pytest.raises(RuntimeError):
        fused(h, w, labels)


def test_loss_impl_dispatch(monkeypatch):
    h, w, labels = make(12, 8, 40, seed=6, ignore_every=4)
    calls, real_rows = [], triton_ce.ce_rows
    monkeypatch.setattr(triton_ce, "ce_rows", lambda *a: calls.append(1) or real_rows(*a))
    auto = linear_cross_entropy(h, w, labels, chunk_size=5)  # CPU tensors: the chunked path
    assert calls == []
    fused_loss = linear_cross_entropy(h, w, labels, chunk_size=5, impl="fused")
    assert calls == [1, 1, 1]  # three chunks of at most 5 tokens
    check("auto(cpu) vs fused", fused_loss, auto, 2e-6)
    with pytest.raises(ValueError, match="loss impl 'triton'"):
        linear_cross_entropy(h, w, labels, impl="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="model.loss_impl=fused needs Triton and CUDA"):
        linear_cross_entropy(h, w, labels, impl="fused")
    with pytest.raises(ConfigError, match="model.loss_impl='triton' is not one of"):
        load_config(None, ["model.loss_impl=triton"])


def test_model_forward_contract_with_fused_loss():
    """Same weights, loss_impl fused vs chunked: same .loss / .lm_loss and parameter gradients;
    .logits stays None when labels are given."""
    from moetrain.config import config_from_dict
    from moetrain.model import build_model
    model_cfg = dict(vocab_size=67, hidden_size=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=24,
                     max_position_embeddings=32, loss_chunk_size=7, moe=dict(n_experts=2, top_k=1, intermediate_size=12))
    outs = []
    for impl in ("chunked", "fused"):
        torch.manual_seed(0)
        model = build_model(config_from_dict({"model": {**model_cfg, "loss_impl": impl}}).model)
        ids = torch.randint(0, 67, (2, 9), generator=torch.Generator().manual_seed(1))
        labels = ids.clone()
        labels[:, -1] = -100
        out = model(ids, labels=labels)
        out.loss.backward()
        assert out.logits is None and model.lm_head.impl == impl
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = outs
    check("loss", b.loss.detach(), a.loss.detach(), 2e-6)
    check("lm_loss", b.lm_loss.detach(), a.lm_loss.detach(), 2e-6)
    assert ga.keys() == gb.keys() and all((ga[n] is None) == (gb[n] is None) for n in ga)
    for name in ga:
        if ga[name] is not None:
            check(name, gb[name], ga[name], 2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_chunked_and_stays_lean(dtype):
    """On the GPU: bf16 (training) and fp32 inputs against the chunked path on the same inputs
    (fp32 math), and peak memory far below one [N, V] fp32 logits tensor."""
    N, D, V, chunk = 16384 + 17, 512, 32000 + 7, 1024
    h, w, labels = make(N, D, V, seed=7, dtype=dtype, ignore_every=9)
    h, w, labels = h.cuda(), w.cuda(), labels.cuda()
    want = loss_and_grads(chunked_cross_entropy, h, w, labels, chunk=chunk)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = loss_and_grads(fused, h, w, labels, chunk_size=chunk)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # fp32 TF32-free matmuls differ from the chunked path only in summation order
    tol = BF16_TOL if dtype == torch.bfloat16 else 1e-4
    for name, a, b in zip(("loss", "dh", "dw"), got, want):
        check(f"{dtype} {name}", a, b, tol)
    # inputs' clones, dh, dw (fp32) and the returned gradients, one chunk of logits and its gradient:
    # about 0.45 GB in fp32, against 2.1 GB for the [N, V] fp32 logits alone
    full = N * V * 4
    assert extra < full / 3, f"peak extra {extra / 2**20:.0f} MiB vs full logits {full / 2**20:.0f} MiB"
