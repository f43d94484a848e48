#!/usr/bin/env python
"""CPU attention paths side by side (one process, one thread, forward + backward of one layer):
dense causal torch SDPA, the chunked kernel and the banded sliding-window path, CPU seconds.

    python scripts/bench_attention_cpu.py --seq-len 16384 --window 1024 --sinks 4
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from moetrain.config.mapping import ArgumentParser
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2, help="best of N (default: %(default)s)")
    a = p.parse_args(argv)
    from moetrain.kernels import chunked
    from moetrain.kernels.sparse_attention import banded
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, a.seq_len, a.head_dim, generator=g).requires_grad_()
               for h in (a.heads, a.kv_heads, a.kv_heads))
    kw = dict(window=a.window, sink_tokens=a.sinks)
    paths = {"dense causal SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             "chunked (window)": lambda: chunked.sparse_attention(q, k, v, **kw),
             "banded (window)": lambda: banded.sparse_attention(q, k, v, **kw)}
    print(f"S={a.seq_len} heads {a.heads}/{a.kv_heads} x {a.head_dim}, window {a.window} + {a.sinks} sinks, "
          "fp32, 1 thread, forward + backward, CPU seconds (best of {a.repeat})".replace("{a.repeat}", str(a.repeat)))
    base = None
    for name, fn in paths.items():
        best = float("inf")
        for _ in range(a.repeat):
            q.grad = k.grad = v.grad = None
            t0 = time.process_time()
            fn().sum().backward()
            best = min(best, time.process_time() - t0)
        base = base or best
        print(f"  {name:20s} {best:7.2f} s   {base / best:5.2f}x dense")
    return 0


if __name__ == "__main__":
    sys.exit(main())
