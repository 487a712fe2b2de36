"""How a server process sets up its memory: glibc's malloc (`mallopt`) and torch's huge pages.

Every server pins glibc's mmap threshold, so that freed activations go back to the system instead
of fragmenting the heap. A CPU server then keeps freed memory in its heap instead, so that every
batch's activations reuse warm pages rather than fresh ones the kernel must fault in and zero;
the cost is a heap that stays at its peak size, so a CPU server gives its free memory back
(`malloc_trim`) once the device threads have been idle for a while (`trim_when_idle`): a burst
of large requests does not keep gigabytes, and steady load keeps its warm pages. All threads
allocate from the main heap, since a thread's own arena maps every large block whatever the
settings. The measurements behind this: docs/performance.md ("Memory").
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value

_KEEP_AT_MOST = 1 << 30  # free bytes at the heap's top beyond this go back to the system

_TORCH_THP_ENV = "THP_MEM_ALLOC_ENABLE"
TRIM_PERIOD_S = 2.0


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
    function = _glibc_function("mallopt")
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int]
    return function


def _glibc_function(name: str) -> Any:
    """A function of the C library (returning int), or None off Linux or where it has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None
    function.restype = ctypes.c_int
    return function


def trim_when_idle(idle_since: Callable[[], float | None], period_s: float = TRIM_PERIOD_S) -> None:
    """Start a thread that gives free heap memory back to the system whenever `idle_since()`
    says the device threads have been idle (since that monotonic time) for a whole period."""
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return

    def watch() -> None:
        while True:
            time.sleep(period_s)
            since = idle_since()
            if since is not None and time.monotonic() - since >= period_s:
                trim(0)

    threading.Thread(target=watch, name="heap-trim", daemon=True).start()


def tune_process_memory(device: str) -> None:
    """What a server does at start, for a process that embeds in-process: on a CPU (or `auto`
    without CUDA), pin the mmap threshold and keep freed memory; huge pages for torch's tensors
    where torch is not imported yet."""
    if "torch" not in sys.modules:
        use_transparent_huge_pages()
    if device == "cpu" or (device == "auto" and not _cuda_visible()):
        pin_mmap_threshold()
        keep_freed_memory()


def _cuda_visible() -> bool:
    import torch  # the caller is about to load a model with it anyway

    return bool(torch.cuda.is_available())


def prepare_process_memory(device_type: str) -> None:
    """On a CPU server, keep freed activations in the heap. Call on the main thread before the
    process starts any other thread."""
    if device_type == "cpu":
        keep_freed_memory()
