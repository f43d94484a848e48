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


def apply_host_memory(cfg) -> bool:
    """The setting a CPU run of cfg uses: release with memory.release_host_memory, else keep."""
    return release_freed_memory() if cfg.memory.release_host_memory else keep_freed_memory()
