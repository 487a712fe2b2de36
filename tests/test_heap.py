"""A CPU server keeps freed activations in its heap (toolkit.heap), so the next batch's tensors
reuse pages that are already mapped instead of faulting in fresh ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

# On a thread of its own (which malloc would give an arena of its own, whose blocks stop at 64 MB),
# allocate and touch 96 MB, free it, and print the resident memory (MB) given back to the system.
_PROBE = """
import sys, threading, psutil, torch
if sys.argv[1] == "keep":
    from toolkit.heap import keep_freed_memory
    assert keep_freed_memory()
def work():
    rss = psutil.Process().memory_info().rss
    block = torch.ones(24 << 20)  # 96 MB of float32, every page touched
    held = psutil.Process().memory_info().rss
    del block
    print((held - psutil.Process().memory_info().rss) / 2**20)
thread = threading.Thread(target=work)
thread.start()
thread.join()
"""


def _returned_mb(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return float(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_activations_stay_mapped_once_the_heap_keeps_them() -> None:
    assert _returned_mb("default") > 90  # malloc's own choice: unmapped on free, refaulted next time
    assert _returned_mb("keep") < 4
