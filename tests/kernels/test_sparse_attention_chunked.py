"""The memory-lean CPU path: equal to the reference (outputs and gradients), gradcheck of its
hand-written backward, and its peak memory at S = 32k."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from moetrain.kernels import chunked, reference
from moetrain.kernels.sparse_attention import chunked as chunked_impl

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [  # (S, D, Hq, Hkv, cu_seqlens, mask kwargs)
    (1, 64, 1, 1, None, {}),
    (63, 64, 4, 1, None, {}),
    (65, 128, 4, 4, None, {"causal": False}),
    (300, 64, 4, 1, [0, 7, 70, 70, 200, 300], {}),
    (300, 128, 4, 1, None, {"window": 40, "sink_tokens": 4}),
    (63, 64, 4, 4, [0, 30, 63], {"sink_tokens": 5}),
    (300, 64, 1, 1, None, {"window": 50, "causal": False}),
    (300, 64, 4, 1, None, {"moba_topk": 3, "block_size": 32}),
    (65, 128, 4, 1, [0, 20, 21, 65], {"moba_topk": 2, "block_size": 16}),
    (300, 64, 4, 4, [0, 100, 101, 250, 300], {"moba_topk": 3, "block_size": 48, "window": 24,
                                              "sink_tokens": 3}),
    (300, 64, 1, 1, None, {"moba_topk": 4, "block_size": 20, "causal": False}),
    (70, 64, 2, 1, None, {"moba_topk": 2, "block_size": 16, "window": 8, "scale": 0.3, "B": 2}),
]


def _run(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("small_pieces", [True, False], ids=["small-pieces", "default-pieces"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c[0]}-D{c[1]}-h{c[2]}/{c[3]}-{c[5]}")
def test_chunked_matches_reference(case, small_pieces, report, monkeypatch):
    if small_pieces:  # many query chunks and key pieces per chunk, as at long S
        monkeypatch.setattr(chunked_impl, "_Q_CHUNK", 16)
        monkeypatch.setattr(chunked_impl, "_PIECE_BUDGET", 16 * 16 * 4)
    S, D, hq, hkv, cu, kw = case
    kw = dict(kw, cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32))
    B = kw.pop("B", 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (hq, hkv, hkv))
    dout = torch.randn(q.shape, generator=g)
    want = _run(reference.sparse_attention, q, k, v, dout, **kw)
    got = _run(chunked.sparse_attention, q, k, v, dout, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        report(name, a, b, atol=1e-5, rtol=1e-4)


def test_chunked_bf16_returns_bf16(report):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 70, 64, generator=g).bfloat16() for h in (4, 2, 2))
    dout = torch.randn(q.shape, generator=g).bfloat16()
    got = _run(chunked.sparse_attention, q, k, v, dout, window=9)
    want = _run(reference.sparse_attention, q.float(), k.float(), v.float(), dout.float(), window=9)
    assert all(t.dtype == torch.bfloat16 for t in got)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):  # fp32 math, bf16 rounding
        report(name, a.float(), b, atol=1e-2, rtol=1.6e-2)


@pytest.mark.parametrize("kw", [{}, {"window": 3, "sink_tokens": 2, "cu_seqlens": [0, 4, 11]},
                                {"moba_topk": 2, "block_size": 3, "causal": False}],
                         ids=["causal", "window+sinks+docs", "moba-noncausal"])
def test_chunked_gradcheck(kw, monkeypatch):
    """The hand-written backward, with chunks small enough to split every dimension."""
    monkeypatch.setattr(chunked_impl, "_Q_CHUNK", 4)
    monkeypatch.setattr(chunked_impl, "_PIECE_BUDGET", 2 * 4 * 3)
    kw = dict(kw)
    if "cu_seqlens" in kw:
        kw["cu_seqlens"] = torch.tensor(kw["cu_seqlens"], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (2, 1, 1))
    assert torch.autograd.gradcheck(lambda q, k, v: chunked.sparse_attention(q, k, v, **kw),
                                    (q, k, v))


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from moetrain.kernels.chunked import sparse_attention
    torch.set_num_threads(1)  # OpenMP hand-offs crawl on a loaded 2-core box
    def status(key):  # bytes, from /proc/self/status
        lines = open("/proc/self/status").read().splitlines()
        return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(key))
    S = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, S, 64, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, 1, S, 64, generator=g)
    sparse_attention(q[:, :, :300], k[:, :, :300], v[:, :, :300]).sum().backward()  # warm-up
    q.grad = k.grad = v.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base, t0 = status("VmRSS:"), time.time()
    sparse_attention(q, k, v).backward(dout)
    print(json.dumps({"peak_delta": status("VmHWM:") - base, "seconds": time.time() - t0,
                      "grads": all(t.grad is not None for t in (q, k, v))}))
""")


@pytest.mark.slow
def test_chunked_peak_memory_32k():
    """Dense causal forward + backward at S = 32k, B = H = 1, D = 64, fp32, in a fresh process:
    the peak RSS growth must stay far below one S x S fp32 matrix (4 GiB)."""
    S = 32768
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(S)], capture_output=True,
                          text=True, timeout=600)
    if "clear_refs" in proc.stderr:
        pytest.skip("cannot reset the peak RSS counter (/proc/self/clear_refs)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    dense = S * S * 4
    print(f"chunked fwd+bwd S={S}: peak RSS +{res['peak_delta'] / 2**20:.0f} MiB "
          f"({res['seconds']:.1f} s); one S x S fp32 matrix = {dense / 2**30:.0f} GiB")
    assert res["grads"]
    assert res["peak_delta"] < dense / 8
