"""How a server process sets up its memory: glibc's malloc (`mallopt`) and torch's huge pages.

Every server pins glibc's mmap threshold, so that freed activations go back to the system instead
of fragmenting the heap. A CPU server then keeps freed memory in its heap instead, so that every
batch's activations reuse warm pages rather than fresh ones the kernel must fault in and zero;
the cost is a heap that stays at its peak size. All threads allocate from the main heap, since a
thread's own arena maps every large block whatever the settings. The measurements behind this:
docs/performance.md ("Memory").
"""

from __future__ import annotations

import ctypes
import logging
import os
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

_TORCH_THP_ENV = "THP_MEM_ALLOC_ENABLE"


def use_transparent_huge_pages() -> None:
    """Ask torch to back its CPU tensors of 2 MiB and more with transparent huge pages: a fresh
    mapping then faults in 512 times fewer steps. torch reads the switch once, at its first
    allocation, so this must run before torch is imported; a value the user set is kept. Where
    the kernel offers no huge pages, torch's madvise is a no-op."""
    os.environ.setdefault(_TORCH_THP_ENV, "1")


def pin_mmap_threshold() -> None:
    """Keep glibc serving blocks over 128 KiB with mmap, so that freeing them returns the memory.

    glibc raises its mmap threshold whenever a large block is freed (up to 32 MiB); from then on
    the activations of each batch, whose sizes change with every packed batch, come from the heap
    and fragment it, and RSS grows under load. Setting the threshold explicitly switches glibc's
    adjustment off. A no-op where the C library is not glibc. A CPU server then turns mappings off
    altogether and keeps its peak heap instead (`keep_freed_memory`).
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


def prepare_process_memory(device_type: str) -> None:
    """On a CPU server, keep freed activations in the heap. Call on the main thread before the
    process starts any other thread."""
    if device_type == "cpu":
        keep_freed_memory()
