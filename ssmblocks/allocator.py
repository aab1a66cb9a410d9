"""CPU speed: let glibc's malloc reuse freed memory for large tensors.

By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mapping from
the kernel and unmaps it on free, so each large temporary of a prefill (a (4, 2048, 1536) float32 tensor is
48 MiB) is page-faulted in again, one page at a time. On a 2-core VM that made elementwise ops 2-5x slower
than their memory traffic, and whole-model prefill 1.3-1.5x slower (docs/benchmarks.md). PyTorch's CPU
performance guide suggests jemalloc or tcmalloc for the same reason; this is the no-install equivalent.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Serve allocations up to ``threshold_bytes`` from malloc's heap and keep freed memory for reuse instead
    of returning it to the system at once (the process's resident memory then stays near its peak).
    Process-wide and lasting; call it once, early. Returns False where it cannot apply (not glibc)."""
    if not sys.platform.startswith("linux") or not 0 < threshold_bytes < 2**31:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
