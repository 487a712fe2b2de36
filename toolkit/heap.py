"""Keep freed memory in the process's heap on a CPU server, so activations reuse warm pages.

glibc's malloc gives every block above its mmap threshold (32 MB at most) a mapping of its own
and unmaps it on free. A CPU forward allocates such blocks in every layer (MiniLM's MLP over an
8k-token batch: 50 MB), so each one started as fresh pages and paid a page fault per 4 KiB: on
this project's 2-core machine, GELU over 6,753 x 1,536 floats on a device thread took 21–25 ms
against 9 ms with mappings off, and a single-threaded forward of 64 texts spent 236 ms of its
2.95 s in GELU and 228 in copies, against 89 and 45 with the memory kept.

Threads allocate from the main heap too: a thread's own arena cannot grow a block past 64 MB
and maps larger ones whatever the settings. The device threads allocate a few dozen blocks per
batch, so sharing one heap's lock costs nothing measurable.

The cost: the heap stays at its peak size (the largest batches' activations) until the process
ends, up to `_KEEP_AT_MOST` of free memory at its top. In a 60 s soak at 64 clients
(`benchmarks/soak.py`) the MiniLM server's RSS rose to 751 MiB within 25 s and stayed there, where
it had wandered between 393 and 509 MiB; it answered 18 % more requests. A GPU server allocates
little host memory and leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_KEEP_AT_MOST = 1 << 30  # free bytes at the heap's top beyond this go back to the system


def keep_freed_memory() -> bool:
    """Serve large blocks from the main heap and keep them when freed; call before starting
    the threads that will allocate. False where the C library has no glibc-style `mallopt`
    (macOS) or refuses, which only costs speed."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_AT_MOST))
    kept = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    if not kept:
        logger.info("malloc settings unchanged: large CPU activations will refault their pages")
    return kept
