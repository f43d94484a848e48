"""glibc malloc settings for CPU training.

A CPU training step allocates and frees many large tensors (the LM head's [chunk, vocab]
logits, MoE buffers, attention blocks). glibc serves blocks above its mmap threshold with
fresh mmaps and trims freed heap tops back to the OS, so a step can fault the same memory
in again page by page (its thresholds adapt to the allocation history, so how often varies
from run to run): 300 steps of the default config took 5.6M minor faults and 17.6 s of
system time without these settings, 1.1M and 4.8 s with them. Fixing the mmap threshold at its maximum (32 MiB on 64-bit) and never
trimming keeps that memory in the process between steps. The peak RSS is unchanged (the same
memory is live at the peak); freed memory is reused instead of returned.

Same effect as MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=... in the
environment; when either variable is set, it is left to the user.

The opposite trade, for runs that are short of memory (`memory.release_host_memory`):
`release_freed_memory()` holds glibc's own starting thresholds (128 KiB) fixed. glibc
normally raises its mmap threshold to the size of each large block freed, after which
blocks up to 32 MiB come from the heap, whose free holes are not returned and do not
always fit the next request: at 16k tokens on the issue-13 shape that fragmentation took the
peak RSS from 1.15 to 1.76 GB. With the thresholds fixed every block of 128 KiB and more
is its own mmap, returned when freed: the peak RSS is what is live, paid for with page
faults (about a quarter slower steps there).

With it, torch's CPU allocator is also asked for transparent huge pages
(`huge_pages_for_large_blocks`, torch's THP_MEM_ALLOC_ENABLE): blocks of 2 MiB and more are
2 MiB-aligned and madvise(MADV_HUGEPAGE)d, so a fresh block faults in 2 MiB at a time
instead of 4 KiB. One step of 131072 tokens on the issue-13 shape: 53.8M -> 11.9M minor
faults, 154 -> 92 s of system time, 270 -> 324 tokens per CPU-second, the same peak RSS.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's upper limit on 64-bit: 32 MiB
_applied = False


RELEASE_THRESHOLD = 128 * 1024  # glibc's starting mmap and trim thresholds


def _set(mmap_threshold: int, trim_threshold: int) -> bool:
    """mallopt both thresholds (Linux with glibc, user's MALLOC_* unset); True when in force."""
    global _applied
    if _applied == (mmap_threshold, trim_threshold):
        return True
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_",
                                                                              "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    _applied = (mmap_threshold, trim_threshold) if ok else False
    return ok


def keep_freed_memory() -> bool:
    """Large blocks stay in the process for reuse (faster steps); True when in force."""
    return _set(MMAP_THRESHOLD_MAX, 2 ** 31 - 1)


def release_freed_memory() -> bool:
    """Blocks of 128 KiB and more go back to the OS when freed (lower peak RSS); True when in force."""
    return _set(RELEASE_THRESHOLD, RELEASE_THRESHOLD)


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # read by torch (c10 alloc_cpu) once, at its first CPU allocation


def huge_pages_for_large_blocks() -> bool:
    """Ask torch's CPU allocator for transparent huge pages on blocks of 2 MiB and more.

    torch reads the variable at its first CPU allocation, so call this before any tensor
    exists (the Trainer does, first thing); a value the user set is left alone. True when
    it is (or will be) on; `huge_pages_in_use()` tells whether it took effect."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    return os.environ[HUGE_PAGES_ENV] == "1"


def huge_pages_in_use() -> bool:
    """Whether a fresh 4 MiB tensor's mapping carries MADV_HUGEPAGE ('hg' in its VmFlags)."""
    import torch
    t = torch.empty(1 << 20)  # 4 MiB: above torch's 2 MiB huge-page threshold
    addr, flags, inside = t.data_ptr(), "", False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "VmFlags:":
                    flags = line
                    break
    except OSError:
        return False
    return " hg" in flags


def apply_host_memory(cfg) -> bool:
    """The setting a CPU run of cfg uses: release with memory.release_host_memory (plus huge
    pages for large blocks, so that what is released faults back in cheaply), else keep.
    Call it before the run creates its first tensor."""
    if cfg.memory.release_host_memory:
        huge_pages_for_large_blocks()
        return release_freed_memory()
    return keep_freed_memory()
