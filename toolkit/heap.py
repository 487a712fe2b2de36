"""Keep freed memory in the process's heap on a CPU server, so activations reuse warm pages.

The server pins glibc's mmap threshold at 128 KiB (`launch_server.pin_mmap_threshold`), and
glibc never serves blocks above 32 MB (64 MB on a thread's own arena) from the heap anyway: such
a block is a mapping of its own, unmapped on free. A CPU forward allocates them in every layer
(MiniLM's MLP over an 8k-token batch: 50 MB), so each batch's activations came as fresh pages
that the kernel had to fault in and zero again; huge pages make the faults fewer, not the
zeroing. On this project's 2-core machine, GELU over 6,753 x 1,536 floats on a thread took
21–25 ms against 9 ms with the memory kept, and the server embedded 4.6–4.7k tok/s at 32
clients against 3.8–3.9k (MiniLM, `benchmarks/serve.py`, alternating runs).

All threads allocate from the main heap, since a thread's own arena maps every block above
64 MB whatever the settings. That includes the tokenizer's threads: they now share one lock with
the device threads, which allocate a few dozen large blocks per batch.

The cost: the heap stays at its peak size (the largest batches' activations, fragmented) until
the process ends; only free memory at its top beyond `_KEEP_AT_MOST` goes back. In a 60 s soak
at 64 clients (`benchmarks/soak.py`, two workers) the MiniLM server's RSS rose to 751 MiB within
25 s and stayed there, where it had wandered between 393 and 509 MiB; it answered 18 % more
requests. More workers hold more batches at once, so more memory. GPU servers keep the pinned
threshold and allocate little host memory.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_KEEP_AT_MOST = 1 << 30  # free bytes at the heap's top beyond this go back to the system


def keep_freed_memory() -> bool:
    """Serve large blocks from the main heap and keep them when freed. Call on the main thread
    before any other thread starts: a thread that has allocated already has an arena of its
    own, which glibc goes on handing to later threads. False where the C library has no
    glibc-style `mallopt` (macOS, Windows) or refuses (musl), which only costs speed."""
    try:
        if not sys.platform.startswith("linux"):
            raise OSError(f"no glibc on {sys.platform}")
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError) as exc:
        logger.info("malloc settings unchanged (%s): CPU activations will refault their pages", exc)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_AT_MOST))
    kept = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    if not kept:
        logger.info("malloc refused the settings: CPU activations will refault their pages")
    return kept
