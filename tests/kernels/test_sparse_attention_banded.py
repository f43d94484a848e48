"""The banded CPU path for sliding windows (kernels/sparse_attention/banded.py): equal to the
reference in outputs and all gradients on odd shapes, sinks, GQA, documents and batches; the
modes it does not compute are refused; the CPU `auto` backend picks it for long sliding layers."""
import pytest
import torch

from moetrain.kernels import reference
from moetrain.kernels.sparse_attention import banded

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [  # (B, S, D, Hq, Hkv, cu_seqlens, window, sinks)
    (1, 1, 16, 1, 1, None, 4, 0),
    (1, 300, 16, 4, 2, None, 37, 0),          # window not a chunk multiple, GQA
    (2, 257, 8, 3, 3, None, 100, 5),          # batch, sinks
    (1, 1000, 32, 2, 1, None, 513, 4),        # window past one chunk: n_prev = 2
    (1, 77, 8, 2, 2, None, 200, 3),           # window longer than the sequence
    (1, 300, 16, 4, 2, None, 1, 0),           # window 1: each token sees itself
    (1, 300, 16, 4, 4, [0, 10, 150, 151, 151, 300], 64, 2),  # documents (one empty), sinks restart
    (3, 193, 24, 6, 2, None, 65, 70),         # more sinks than the window
]


def _run(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-S{c[1]}-D{c[2]}-h{c[3]}/{c[4]}-w{c[6]}-s{c[7]}"
                                                     + ("-docs" if c[5] else ""))
def test_banded_matches_reference(case, dtype, report):
    B, S, D, hq, hkv, cu, window, sinks = case
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=dtype) for h in (hq, hkv, hkv))
    dout = torch.randn(q.shape, generator=g, dtype=dtype)
    kw = dict(window=window, sink_tokens=sinks, cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32))
    want = _run(reference.sparse_attention, q, k, v, dout, **kw)
    got = _run(banded.sparse_attention, q, k, v, dout, **kw)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype
        report(name, a, b, **tol)


def test_banded_small_chunks_many_bands(report, monkeypatch):
    """Chunks far smaller than the window: every query reads keys from several earlier chunks."""
    monkeypatch.setattr(banded, "_CHUNK", 16)
    monkeypatch.setattr(banded, "_MIN_CHUNK", 16)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 211, 16, generator=g, dtype=torch.float64) for h in (2, 1, 1))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    kw = dict(window=70, sink_tokens=3)
    for name, a, b in zip(("out", "dq", "dk", "dv"), _run(banded.sparse_attention, q, k, v, dout, **kw),
                          _run(reference.sparse_attention, q, k, v, dout, **kw)):
        report(name, a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("B", [1, 2])
def test_banded_slabs(B, report, monkeypatch):
    """Many flash calls (slabs of 3 chunks, the first chunks with their own masks in their own
    call): equal to the reference, and the backward keeps no band copies: what autograd saves
    is q, k, v, the output and its logsumexp."""
    monkeypatch.setattr(banded, "_CHUNK", 16)
    monkeypatch.setattr(banded, "_MIN_CHUNK", 16)
    monkeypatch.setattr(banded, "_SLAB_TOKENS", 48)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, h, 203, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    kw = dict(window=40, sink_tokens=5)
    for name, a, b in zip(("out", "dq", "dk", "dv"), _run(banded.sparse_attention, q, k, v, dout, **kw),
                          _run(reference.sparse_attention, q, k, v, dout, **kw)):
        report(name, a, b, atol=1e-10, rtol=1e-9)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        banded.sparse_attention(*(t.detach().requires_grad_() for t in (q, k, v)), **kw)
    lse = B * 4 * 13 * 16  # B x Hq x chunks (ceil(203 / 16)) x chunk rows
    assert sum(saved) == q.numel() + k.numel() + v.numel() + q.numel() + lse


@pytest.mark.parametrize("kw", [{"window": None}, {"window": 8, "causal": False},
                                {"window": 8, "moba_topk": 2, "block_size": 16}])
def test_banded_refuses_other_modes(kw):
    q = torch.randn(1, 2, 40, 8)
    with pytest.raises(ValueError, match="sliding-window"):
        banded.sparse_attention(q, q, q, **kw)


def test_auto_backend_picks_banded_for_long_sliding_layers(monkeypatch):
    from moetrain.model import attention as A
    calls = []  # auto_attention calls these module functions directly
    monkeypatch.setattr(A, "banded_attention", lambda *a, **kw: calls.append("banded") or a[0])
    monkeypatch.setattr(A, "chunked_attention", lambda *a, **kw: calls.append("chunked") or a[0])
    monkeypatch.setattr(A, "_SDPA_MASK_MAX_SEQ", 32)  # 64 tokens count as long here
    q = torch.zeros(1, 2, 64, 8)
    A.auto_attention(q, q, q, window=16, sink_tokens=0, moba_topk=None, block_size=16)  # 64 > 2 x 16
    A.auto_attention(q, q, q, window=8, sink_tokens=0, moba_topk=2, block_size=16)     # MoBA: not banded
    assert calls == ["banded", "chunked"]
