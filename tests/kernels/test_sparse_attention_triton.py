"""Triton kernels vs the reference: outputs and dq/dk/dv, every mask mode and combinations.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py), which is slow, so the cases below cover the required odd
shapes (S = 1, 63, 65, 300; D = 64, 128; Hq/Hkv = 1 and 4; 1-5 documents)
through a hand-picked list rather than a cartesian product.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moetrain.kernels import chunked, reference
from moetrain.kernels import sparse_attention as dispatch
from moetrain.kernels import triton as triton_attn
from moetrain.kernels.sparse_attention import op
from moetrain.kernels.sparse_attention.common import check_args, moba_select
from moetrain.kernels.sparse_attention.reference import dense_mask

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.skipif(not CUDA and not op.interpreting(),
                                 reason="needs CUDA or TRITON_INTERPRET=1 before triton import"),
              pytest.mark.usefixtures("one_thread")]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
MOBA = dict(moba_topk=3, block_size=32)
_RTOL = {BF16: 1.6e-2, F16: 1e-3}
# (S, D, Hq, Hkv, cu_seqlens, dtype, mask kwargs)
CASES = [
    (1, 64, 1, 1, None, F32, {}),
    (63, 64, 4, 1, None, F32, {}),
    (65, 128, 4, 4, None, F32, {"causal": False}),
    (300, 128, 1, 1, None, F32, {}),
    (300, 64, 4, 1, [0, 7, 70, 70, 200, 300], F32, {}),
    (65, 64, 1, 1, None, F32, {"window": 16}),
    (300, 64, 4, 1, None, F32, {"window": 40, "sink_tokens": 4}),
    (63, 128, 4, 4, [0, 30, 63], F32, {"sink_tokens": 5}),
    (300, 64, 1, 1, None, F32, {"window": 50, "causal": False}),
    (300, 64, 4, 1, None, F32, MOBA),
    (65, 128, 4, 1, [0, 20, 21, 65], F32, {"moba_topk": 2, "block_size": 16}),
    (300, 64, 4, 4, [0, 100, 101, 250, 300], F32,
     {"moba_topk": 3, "block_size": 48, "window": 24, "sink_tokens": 3}),
    (300, 64, 1, 1, None, F32, {"moba_topk": 4, "block_size": 20, "causal": False}),
    (63, 64, 1, 1, None, F32, {"moba_topk": 1, "block_size": 16}),
    (1, 128, 4, 1, [0, 1], F32, {"moba_topk": 3, "block_size": 16, "window": 8, "sink_tokens": 2}),
    (300, 128, 4, 1, None, BF16, {}),
    (65, 64, 4, 4, [0, 10, 40, 65], F16, {"window": 16, "sink_tokens": 2}),
    (300, 64, 1, 1, None, BF16, {"moba_topk": 3, "block_size": 64, "window": 32}),
    (63, 128, 1, 1, None, F16, {"moba_topk": 2, "block_size": 16, "causal": False}),
]


def _case_id(c):
    S, D, hq, hkv, cu, dt, kw = c
    docs = 1 if cu is None else len(cu) - 1
    mode = ",".join(f"{k}={v}" for k, v in kw.items()) or "full"
    return f"S{S}-D{D}-h{hq}/{hkv}-docs{docs}-{str(dt)[6:]}-{mode}"


def _inputs(S, D, hq, hkv, dtype, bshd=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    def make(h):
        if bshd:  # [B, S, H, D] memory viewed as [B, H, S, D] (what a model's projection gives)
            return torch.randn(1, S, h, D, generator=g).transpose(1, 2)
        return torch.randn(1, h, S, D, generator=g)
    return [make(h).to(DEVICE, dtype) for h in (hq, hkv, hkv)]


def _run(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _lowp_baseline(q, k, v, dout, **kw):
    """The reference's math done in q's low precision: the error budget (FlashAttention tests)."""
    opts = dict(causal=True, window=None, sink_tokens=0, block_size=64, moba_topk=None,
                cu_seqlens=None, scale=None)
    spec = check_args(q, k, v, **{**opts, **kw})
    mask = dense_mask(spec, q.shape[2], moba_select(q, k, spec) if spec.moba else None, q.device)
    G = q.shape[1] // k.shape[1]
    def attn(q, k, v, **_):
        s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * spec.scale
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        return p @ v.repeat_interleave(G, 1)
    return _run(attn, q, k, v, dout)


def _compare(report, got, ref, dtype, base=None):
    names = ("out", "dq", "dk", "dv")
    for i, name in enumerate(names):
        if dtype == F32:
            report(name, got[i].float(), ref[i], atol=1e-5, rtol=1e-4)
            continue
        # FlashAttention's test rule: at most twice the error of the same math done in
        # low precision, plus the unavoidable rounding of the result (torch's default rtol).
        budget = (base[i].float() - ref[i]).abs().max().item()
        report(name, got[i].float(), ref[i], atol=2 * budget + 1e-3, rtol=_RTOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_matches_reference(case, report):
    S, D, hq, hkv, cu, dtype, kw = case
    kw = dict(kw, cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32))
    q, k, v = _inputs(S, D, hq, hkv, dtype, bshd=(S == 300 and hq == 4 and "window" in kw))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    ref = _run(reference.sparse_attention, q.float(), k.float(), v.float(), dout.float(), **kw)
    got = _run(triton_attn.sparse_attention, q, k, v, dout, **kw)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert [g.dtype for g in got[1:]] == [dtype] * 3
    base = None if dtype == F32 else _lowp_baseline(q, k, v, dout, **kw)
    _compare(report, got, ref, dtype, base)


@pytest.mark.parametrize("tiles", [(16, 32), (64, 16)], ids=["M16N32", "M64N16"])
def test_triton_other_tilings(tiles, report, monkeypatch):
    """BLOCK_M != BLOCK_N (the GPU autotuner picks such configs) on a mixed-mode case."""
    if not op.interpreting():
        pytest.skip("tile sizes are autotuned on GPU")
    monkeypatch.setitem(op.INTERPRET_TILES, "BLOCK_M", tiles[0])
    monkeypatch.setitem(op.INTERPRET_TILES, "BLOCK_N", tiles[1])
    kw = dict(moba_topk=2, block_size=32, window=20, sink_tokens=3, scale=0.3,
              cu_seqlens=torch.tensor([0, 50, 130], dtype=torch.int32))
    q, k, v = _inputs(130, 64, 4, 1, F32, seed=2)
    dout = torch.randn_like(q)
    ref = _run(reference.sparse_attention, q, k, v, dout, **kw)
    _compare(report, _run(triton_attn.sparse_attention, q, k, v, dout, **kw), ref, F32)


def test_triton_batch_of_two(report):
    """B > 1 (no cu_seqlens): MoBA selections differ per batch row and head. q is a slice of a
    fused projection (strides with gaps), as a model's qkv split gives."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 70, 3, 2, 64, generator=g).to(DEVICE)[:, :, 0].transpose(1, 2)
    k, v = (torch.randn(2, 1, 70, 64, generator=g).to(DEVICE) for _ in range(2))
    dout = torch.randn_like(q)
    kw = dict(moba_topk=2, block_size=16, window=8)
    ref = _run(reference.sparse_attention, q, k, v, dout, **kw)
    _compare(report, _run(triton_attn.sparse_attention, q, k, v, dout, **kw), ref, F32)


def test_dispatcher_uses_chunked_on_cpu():
    q, k, v = _inputs(40, 64, 2, 1, F32)
    q, k, v = (t.cpu().requires_grad_() for t in (q, k, v))
    out = dispatch(q, k, v, window=8)
    assert type(out.grad_fn).__name__ == "_ChunkedAttentionBackward"
    torch.testing.assert_close(out, chunked.sparse_attention(q, k, v, window=8))


def test_triton_rejects_bad_input():
    q, k, v = _inputs(8, 64, 2, 1, F32)
    with pytest.raises(ValueError, match="dtype"):
        triton_attn.sparse_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="B == 1"):
        triton_attn.sparse_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                                     v.expand(2, -1, -1, -1), cu_seqlens=torch.tensor([0, 8]))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kw", [{}, {"window": 256, "sink_tokens": 16},
                                {"moba_topk": 3, "block_size": 128}],
                         ids=["causal", "window+sinks", "moba"])
def test_triton_gpu_bf16_long(kw, report):
    """Autotuned kernels on the GPU at a length where tiles are full size."""
    q, k, v = _inputs(2048, 128, 8, 2, BF16)
    dout = torch.randn_like(q)
    ref = _run(reference.sparse_attention, q.float(), k.float(), v.float(), dout.float(), **kw)
    got = _run(dispatch, q, k, v, dout, **kw)
    _compare(report, got, ref, BF16, _lowp_baseline(q, k, v, dout, **kw))


_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from moetrain.kernels.sparse_attention import triton_bwd, triton_fwd

    PTR = {"CU": "*i32", "SEL": "*i32", "LSE": "*fp32", "DELTA": "*fp32"}
    def build(fn, dtype, **flags):
        consts = dict(HEAD_DIM=128, DP=128, KP=4, BLOCK_M=128, BLOCK_N=64, CAUSAL=True, FULL=True,
                      WINDOW=False, HAS_SINK=False, MOBA=False, PREC="ieee", UPCAST=False)
        consts.update(flags)
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n in PTR or n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                sig[n] = PTR.get(n, "*" + dtype)
            else:
                sig[n] = "fp32" if n.endswith("scale") else "i32"
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=8, num_stages=2))
    kernels = (triton_fwd.sparse_attn_fwd, triton_bwd.sparse_attn_bwd_dq,
               triton_bwd.sparse_attn_bwd_dkdv)
    for fn in kernels:
        build(fn, "bf16")
        build(fn, "fp16", HEAD_DIM=64, DP=64, BLOCK_N=32, FULL=False, WINDOW=True, HAS_SINK=True,
              MOBA=True, CAUSAL=False, PREC="tf32")
        build(fn, "fp32", HEAD_DIM=80, DP=128, BLOCK_M=64, BLOCK_N=32, FULL=False, WINDOW=True,
              PREC="tf32")
    print("compiled")
""")


def test_kernels_compile_for_sm90():
    """The interpreter accepts more than the compiler: build real sm_90 cubins (no GPU needed)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("Triton's bundled ptxas is unavailable")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
