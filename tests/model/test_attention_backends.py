"""The model's CPU backends (masked SDPA, chunked) agree with the reference kernel."""
import pytest
import torch

from moetrain.model.attention import get_backend, kernel_kwargs, layer_kind
from moetrain.config import AttentionConfig

MODES = [
    dict(window=None, sink_tokens=0, moba_topk=None),
    dict(window=7, sink_tokens=0, moba_topk=None),
    dict(window=5, sink_tokens=3, moba_topk=None),
    dict(window=None, sink_tokens=2, moba_topk=2),
    dict(window=4, sink_tokens=0, moba_topk=3),
]


@pytest.mark.parametrize("backend", ["sdpa", "chunked", "auto"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cu", [None, [0, 9, 30, 41]])
def test_backend_matches_reference(backend, mode, cu):
    torch.manual_seed(0)
    q = torch.randn(1, 4, 41, 16, requires_grad=True)
    k = torch.randn(1, 2, 41, 16, requires_grad=True)
    v = torch.randn(1, 2, 41, 16, requires_grad=True)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    outs = []
    for name in ("reference", backend):
        o = get_backend(name)(q, k, v, causal=True, block_size=6, cu_seqlens=cu_t, **mode)
        g = torch.autograd.grad((o * torch.linspace(-1, 1, 16)).sum(), (q, k, v))
        outs.append((o.detach(), g))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layer_pattern_cycles_and_hybrid_tail():
    attn = AttentionConfig(layer_types=["sliding", "sliding", "full"], full_attention_last_n=2)
    kinds = [layer_kind(attn, i, 8) for i in range(8)]
    assert kinds == ["sliding", "sliding", "full", "sliding", "sliding", "full", "full", "full"]
    moba = AttentionConfig(layer_types=["moba"], moba_topk=4, block_size=32, sink_tokens=8)
    assert kernel_kwargs(moba, "moba") == dict(window=None, sink_tokens=8, moba_topk=4, block_size=32)
    assert kernel_kwargs(moba, "full")["moba_topk"] is None
