"""`moetrain.kernels` entry points: names, signatures, cheap GPU-free import."""
import inspect
import subprocess
import sys

import torch

import moetrain.kernels as kernels
from moetrain.kernels import chunked, reference
from moetrain.kernels import triton as triton_attn
from moetrain.kernels.sparse_attention import op  # noqa: F401 - loads the subpackage's modules


def test_entry_points_share_the_signature():
    want = inspect.signature(reference.sparse_attention)
    for fn in (kernels.sparse_attention, chunked.sparse_attention, triton_attn.sparse_attention):
        assert inspect.signature(fn) == want
    assert list(want.parameters) == ["q", "k", "v", "causal", "window", "sink_tokens",
                                     "block_size", "moba_topk", "cu_seqlens", "scale"]


def test_dispatcher_survives_submodule_imports():
    # the function and the subpackage share a name; importing submodules must not rebind it
    assert callable(kernels.sparse_attention) and inspect.isfunction(kernels.sparse_attention)
    q = torch.randn(1, 2, 5, 8)
    assert kernels.sparse_attention(q, q, q).shape == q.shape


def test_import_is_cheap_and_gpu_free():
    code = ("import sys, torch, moetrain.kernels as K\n"
            "q = torch.randn(1, 1, 4, 8)\n"
            "K.sparse_attention(q, q, q, window=2)\n"
            "print('triton' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
