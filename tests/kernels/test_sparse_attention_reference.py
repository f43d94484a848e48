"""The reference is the definition: check it against SDPA, a literal reading of DESIGN's
rule (loops), gradcheck, and its input validation."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from moetrain.kernels import reference
from moetrain.kernels.sparse_attention.common import check_args, moba_select
from moetrain.kernels.sparse_attention.reference import dense_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(S, D, hq, hkv, dtype=torch.float64, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, S, D, generator=g, dtype=dtype) for h in (hq, hkv, hkv)]


def _spec(q, k, **kw):
    opts = dict(causal=True, window=None, sink_tokens=0, block_size=64, moba_topk=None,
                cu_seqlens=None, scale=None)
    return check_args(q, k, k, **{**opts, **kw})


@pytest.mark.parametrize("S,D,hq,hkv,B,causal", [
    (1, 64, 1, 1, 1, True), (63, 64, 4, 1, 2, True), (65, 128, 4, 4, 1, True),
    (300, 64, 4, 2, 1, True), (65, 64, 4, 1, 2, False)])
def test_reference_full_matches_sdpa(S, D, hq, hkv, B, causal, report):
    q, k, v = (t.requires_grad_() for t in _qkv(S, D, hq, hkv, B=B))
    out = reference.sparse_attention(q, k, v, causal=causal)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hkv, 1),
                                          v.repeat_interleave(hq // hkv, 1), is_causal=causal)
    report("out", out, want, atol=1e-10, rtol=1e-10)
    dout = torch.randn_like(out)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(want, (q, k, v), dout)):
        report(name, a, b, atol=1e-10, rtol=1e-10)


def _literal_selection(q, k, cu, bs, K):
    """DESIGN's MoBA rule by loops: {(b, h, i): set of selected doc-relative blocks}."""
    B, Hq, S, _ = q.shape
    G = Hq // k.shape[1]
    chosen = {}
    for b, h, d in itertools.product(range(B), range(Hq), range(len(cu) - 1)):
        a, e = cu[d], cu[d + 1]
        means = [k[b, h // G, a + c * bs: min(e, a + (c + 1) * bs)].mean(0)
                 for c in range(-(-(e - a) // bs))]
        for i in range(a, e):
            own = (i - a) // bs  # eligible blocks end before the own block starts: c < own
            ranked = sorted(range(own), key=lambda c: (-float(q[b, h, i] @ means[c]), c))
            chosen[b, h, i] = set(ranked[:K]) | {own}
    return chosen


def _literal_mask(q, k, cu, causal, window, sinks, bs, topk):
    B, Hq, S, _ = q.shape
    sel = _literal_selection(q, k, cu, bs, topk - 1) if topk else None
    doc = [d for d in range(len(cu) - 1) for _ in range(cu[d], cu[d + 1])]
    mask = torch.zeros(B, Hq, S, S, dtype=torch.bool)
    for b, h, i, j in itertools.product(range(B), range(Hq), range(S), range(S)):
        if doc[i] != doc[j] or (causal and j > i):
            continue
        start = cu[doc[j]]
        modes = []
        if window is not None:
            modes.append(i - window < j)
        if sinks:
            modes.append(j - start < sinks)
        if topk:
            modes.append((j - start) // bs in sel[b, h, i])
        mask[b, h, i, j] = not modes or any(modes)
    return mask


@pytest.mark.parametrize("causal,window,sinks,topk", [
    (True, None, 0, None), (True, 3, 0, None), (True, None, 2, None), (True, 3, 2, None),
    (True, None, 0, 3), (True, 2, 1, 2), (False, None, 0, 3), (False, 4, 0, None),
    (True, None, 0, 1)])
def test_reference_mask_is_design_rule(causal, window, sinks, topk):
    cu = [0, 5, 5, 20, 37]
    q, k, _ = _qkv(37, 8, 4, 2, seed=3)
    kw = dict(causal=causal, window=window, sink_tokens=sinks, block_size=4, moba_topk=topk,
              cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    spec = _spec(q, k, **kw)
    sel = moba_select(q, k, spec) if topk else None
    got = dense_mask(spec, 37, sel, q.device).expand(1, 4, 37, 37)
    want = _literal_mask(q, k, cu, causal, window, sinks, 4, topk)
    assert torch.equal(got, want)
    # and the output is SDPA under that mask (every row has a visible key here)
    v = torch.randn_like(k)
    out = reference.sparse_attention(q, k, v, **kw)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=want))


def test_moba_selection_ties_go_to_lower_block():
    q, _, _ = _qkv(40, 8, 2, 1)
    k = torch.ones(1, 1, 40, 8, dtype=torch.float64)  # every block has the same mean
    sel = moba_select(q, k, _spec(q, k, block_size=5, moba_topk=3))
    assert sel[0, :, 39].tolist() == [[0, 1], [0, 1]]  # query in block 7
    assert sel[0, :, 6].tolist() == [[0, -1], [0, -1]]  # block 1: only block 0 is eligible
    assert (sel[0, :, :5] == -1).all()  # block 0 has nothing before it


def test_moba_selection_is_per_document():
    q, k, _ = _qkv(30, 8, 1, 1)
    spec = _spec(q, k, block_size=4, moba_topk=3, cu_seqlens=torch.tensor([0, 10, 30]))
    sel = moba_select(q, k, spec)
    assert sel[0, 0, 13].tolist() == [-1, -1]  # first block of doc 2, although doc 1 precedes it
    assert set(sel[0, 0, 29].tolist()) <= set(range(4))  # doc-relative ids, own block is 4


@pytest.mark.parametrize("kw", [
    {}, {"causal": False}, {"window": 3, "sink_tokens": 2, "cu_seqlens": [0, 4, 11]},
    {"moba_topk": 2, "block_size": 3},
    {"moba_topk": 2, "block_size": 2, "window": 2, "causal": False}],
    ids=["causal", "full", "window+sinks+docs", "moba", "moba+window-noncausal"])
def test_reference_gradcheck(kw):
    kw = dict(kw)
    if "cu_seqlens" in kw:
        kw["cu_seqlens"] = torch.tensor(kw["cu_seqlens"], dtype=torch.int32)
    q, k, v = (t.requires_grad_() for t in _qkv(11, 3, 2, 1, seed=5))
    assert torch.autograd.gradcheck(lambda q, k, v: reference.sparse_attention(q, k, v, **kw),
                                    (q, k, v))


@pytest.mark.parametrize("make,kw,match", [
    (lambda: _qkv(8, 4, 2, 1, B=2), {"cu_seqlens": torch.tensor([0, 8])}, "B == 1"),
    (lambda: _qkv(8, 4, 3, 2), {}, "multiple"),
    (lambda: _qkv(8, 4, 2, 1), {"window": 0}, "window"),
    (lambda: _qkv(8, 4, 2, 1), {"moba_topk": 0}, "moba_topk"),
    (lambda: _qkv(8, 4, 2, 1), {"block_size": 2.5}, "block_size"),
    (lambda: _qkv(8, 4, 2, 1), {"cu_seqlens": torch.tensor([0, 5])}, "end at S"),
    (lambda: _qkv(8, 4, 2, 1), {"cu_seqlens": torch.tensor([0.0, 8.0])}, "integer"),
    (lambda: [t[0] for t in _qkv(8, 4, 2, 1)], {}, "4-D"),
    (lambda: _qkv(8, 4, 2, 1)[:2] + [torch.zeros(1, 1, 8, 5, dtype=torch.float64)], {},
     "same shape"),
])
def test_reference_rejects_bad_input(make, kw, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        reference.sparse_attention(q, k, v, **kw)
