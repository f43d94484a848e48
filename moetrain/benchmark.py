"""Timing and peak-memory helpers shared by the benchmark scripts (scripts/bench*.py),
so that every benchmark measures the same way.

    time_ms(fn, device)        mean ms per call (CUDA: triton's do_bench; CPU: wall clock)
    timed(fn, device)          seconds of one call, the device synchronised around it
    peak_bytes(fn, device)     memory above the warm state while fn runs
                               (CUDA: max_memory_allocated; CPU: the process high-water
                               mark VmHWM, reset through /proc/self/clear_refs after
                               returning freed heap to the OS)
    memory_cap(bytes, name)    a fresh memory cgroup for one child process (preexec_fn),
                               so that a try which blows up kills only itself
    longest(try_fn, ...)       the longest size that passes: doubling, then bisection
    cpu_matmul_flops_per_cpu_s()  fp32 matmul FLOPs per CPU-second: a CPU MFU denominator
                               that other load on a shared machine does not lower
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
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


def _own_memory_cgroup() -> str | None:
    """This process's cgroup-v1 memory directory (v2: the unified one), if we may write it."""
    try:
        for line in open("/proc/self/cgroup"):
            _, ctrl, path = line.strip().split(":", 2)
            root = "/sys/fs/cgroup/memory" if "memory" in ctrl.split(",") else (
                "/sys/fs/cgroup" if ctrl == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers") else None)
            if root and os.access(root + path, os.W_OK):
                return root + path
    except OSError:
        pass
    return None


@contextlib.contextmanager
def memory_cap(cap_bytes: int, name: str):
    """Yields a preexec_fn putting the child in a fresh memory cgroup limited to cap_bytes
    (a child of ours, so any limit we run under still applies); None when cgroups are not
    writable: then watch the child's RSS with watch_rss instead."""
    parent = _own_memory_cgroup()
    if parent is None:
        yield None
        return
    path = os.path.join(parent, name)
    os.makedirs(path, exist_ok=True)
    v1 = os.path.exists(os.path.join(path, "memory.limit_in_bytes"))
    with open(os.path.join(path, "memory.limit_in_bytes" if v1 else "memory.max"), "w") as f:
        f.write(str(int(cap_bytes)))
    procs = os.path.join(path, "cgroup.procs")
    try:
        yield lambda: open(procs, "w").write(str(os.getpid()))
    finally:
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)


def watch_rss(proc, cap_bytes: int, fired: list) -> None:
    """Fallback cap (run it in a thread): SIGKILL `proc` once its RSS exceeds cap_bytes."""
    while proc.poll() is None:
        try:
            rss = next(int(l.split()[1]) * 1024 for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS"))
        except (OSError, StopIteration):
            return
        if rss > cap_bytes:
            fired.append(rss)
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.02)


def longest(try_fn, start: int, max_len: int, granule: int):
    """Longest S that try_fn(S) passes: double from `start` while it passes (up to max_len),
    then bisect between the last pass and the first failure to within max(granule, lo/8).
    Returns (lo or None, hi or None, tries): hi None means max_len was reached."""
    tries, lo, hi, S = [], None, None, start
    while S <= max_len:
        ok = try_fn(S)
        tries.append((S, ok))
        if not ok:
            hi = S
            break
        lo, S = S, S * 2
    while lo is not None and hi is not None and hi - lo > max(granule, lo // 8):
        mid = (lo + hi) // 2 // granule * granule
        if mid <= lo:
            break
        ok = try_fn(mid)
        tries.append((mid, ok))
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo, hi, tries


def cpu_matmul_flops_per_cpu_s(n: int = 1024, reps: int = 4, trials: int = 5) -> float:
    """fp32 matmul FLOPs per CPU-second (all threads' CPU time): the CPU MFU denominator."""
    from moetrain.train.metrics import measure_cpu_peak_flops
    return measure_cpu_peak_flops(n, reps, trials, clock=time.process_time)
