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


def test_repo_root_on_sys_path_does_not_shadow_hub_kernels(tmp_path):
    # `python -m pytest` and `python -c` from the repository root put it on sys.path, where our
    # kernels/ folder would shadow Hugging Face's `kernels` package that transformers imports.
    import os
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import importlib.util, kernels, moetrain.kernels as K\n"
            "installed = importlib.util.find_spec('kernels') is not None\n"
            "print(os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.join(ROOT, 'kernels'), callable(K.sparse_attention))\n")
    code = f"import os\nROOT = {root!r}\n" + code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    if proc.returncode != 0:  # no hub package installed: the name must fail cleanly, never load ours
        assert "no package 'kernels' is installed" in proc.stderr, proc.stderr[-2000:]
    else:
        assert proc.stdout.split() == ["False", "True"], proc.stdout
