"""Timing and peak-memory helpers shared by the benchmark scripts (scripts/bench*.py),
so that every benchmark measures the same way.

    time_ms(fn, device)        mean ms per call (CUDA: triton's do_bench; CPU: wall clock)
    timed(fn, device)          seconds of one call, the device synchronised around it
    peak_bytes(fn, device)     memory above the warm state while fn runs
                               (CUDA: max_memory_allocated; CPU: the process high-water
                               mark VmHWM, reset through /proc/self/clear_refs after
                               returning freed heap to the OS)
"""
from __future__ import annotations

import ctypes
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 3, warmup: int = 2) -> float:
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=30)
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (e.g. VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = proc_status("VmRSS")
    fn()
    return proc_status("VmHWM") - base
