"""How the server's process uses glibc's malloc (`mallopt`): every server pins the mmap
threshold; a CPU server then keeps freed memory in its heap, so activations reuse warm pages.

Every server pins glibc's mmap threshold at 128 KiB (`pin_mmap_threshold`), and
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
from collections.abc import Callable

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value

_KEEP_AT_MOST = 1 << 30  # free bytes at the heap's top beyond this go back to the system


def pin_mmap_threshold() -> None:
    """Keep glibc serving blocks over 128 KiB with mmap, so that freeing them returns the memory.

    glibc raises its mmap threshold whenever a large block is freed (up to 32 MiB); from then on
    the activations of each batch, whose sizes change with every packed batch, come from the heap
    and fragment it. Under benchmarks/soak.py the server's RSS grew by half within a minute that
    way, and served fewer requests; with the threshold pinned it stays flat. Setting it explicitly
    switches glibc's adjustment off. A no-op where the C library is not glibc. A CPU server then
    turns mappings off altogether and keeps its peak heap instead (`keep_freed_memory`): there,
    fresh pages for every batch cost more than the memory.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        logger.debug("mallopt is unavailable: the C library's own memory policy stays")
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def keep_freed_memory() -> bool:
    """Serve large blocks from the main heap and keep them when freed. Call on the main thread
    before any other thread starts: a thread that has allocated already has an arena of its
    own, which glibc goes on handing to later threads. False where the C library has no
    glibc-style `mallopt` (macOS, Windows) or refuses (musl), which only costs speed."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        logger.info("mallopt is unavailable: CPU activations will refault their pages")
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_AT_MOST))
    kept = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    if not kept:
        logger.info("malloc refused the settings: CPU activations will refault their pages")
    return kept


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """The C library's `mallopt(parameter, value)`, or None off Linux or where it has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    function: Callable[[int, int], int] = mallopt
    return function
