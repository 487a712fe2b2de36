"""A CPU server keeps freed activations in its heap (toolkit.execution.memory), so the next batch's tensors
reuse pages that are already mapped instead of faulting in fresh ones."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

# As in the server: the settings first, on the main thread; then a loading thread that allocates
# and ends; then a device thread that allocates and touches 96 MB (past what a thread's own arena
# keeps), frees it and prints the resident memory (MB) that went back to the system.
_PROBE = """
import sys, threading, psutil, torch
if sys.argv[1] == "keep":
    from toolkit.execution.memory import keep_freed_memory
    assert keep_freed_memory()
def load():
    torch.ones(1 << 20)
def serve():
    block = torch.ones(24 << 20)
    held = psutil.Process().memory_info().rss
    del block
    print((held - psutil.Process().memory_info().rss) / 2**20)
for work in (load, serve):
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
"""


def _returned_mb(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return float(done.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's")
def test_freed_activations_stay_mapped_once_the_heap_keeps_them() -> None:
    assert _returned_mb("default") > 90  # malloc's own choice: unmapped on free, refaulted next time
    assert _returned_mb("keep") < 4
