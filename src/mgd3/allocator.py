"""The CPU memory allocator of a sampling process: keep freed memory for the next step.

glibc's malloc gives freed memory back to the kernel — chunks above its mmap threshold are
unmapped on free, and the top of the heap is trimmed once more than the trim threshold is free —
and both thresholds adapt to the largest chunk freed so far, that is to whatever the process
happened to do before. A sampling step allocates and frees the same tens of MB of activations
every step, so with low thresholds every step faults the same pages in again, each one zeroed by
the kernel: on the project's 2-core CPU, plain sampling of 10 images x 10 steps made 87 000
minor page faults, and 1 000 with fixed thresholds (same latents, byte for byte;
benchmarks/results/plain_vs_mgd3.md). That is one reason MGD³ had looked faster than plain
sampling: its mode discovery had freed larger arrays first and so raised the thresholds by accident.

`keep_freed_memory()` fixes the thresholds instead (mmap threshold 32 MiB, glibc's maximum on
64-bit; trim threshold 256 MiB), so every run starts alike. Linux/glibc only (elsewhere a no-op);
a user's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment settings win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 << 20

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (once per process); True when they are set."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False  # the user tuned malloc
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc malloc thresholds fixed: %s", _applied)
    return _applied
