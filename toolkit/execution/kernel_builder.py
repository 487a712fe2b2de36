"""The short-batch kernel builder: a background thread that has oneDNN build the kernels of the
packed short-batch products (`toolkit.models.short_batch_linear`) while the server is idle."""

from __future__ import annotations

import logging
import threading
import time

import torch

from toolkit.execution.device_threads import DeviceThreads
from toolkit.models.short_batch_linear import PACKED_MAX_ROWS, build_kernels, distinct_packed_layers

logger = logging.getLogger(__name__)

KERNEL_BUILD_DELAY_S = 1.0
KERNEL_BUILD_IDLE_POLL_S = 0.01


def build_short_batch_kernels(module: torch.nn.Module, device_threads: DeviceThreads) -> None:
    """Where short CPU batches take packed oneDNN products, have oneDNN build their kernels for
    every short row count in the background, so that no request pays for them. Building starts
    `KERNEL_BUILD_DELAY_S` after start-up (at once, it slowed the first requests), and goes one
    row count per job, only while every device thread is idle: on the first thread, at the thread
    count of a lone batch."""
    layers = distinct_packed_layers(module)
    if not layers:
        return

    def build_all() -> None:
        time.sleep(KERNEL_BUILD_DELAY_S)
        started = time.perf_counter()
        for rows in range(1, PACKED_MAX_ROWS + 1):
            while not device_threads.idle:
                time.sleep(KERNEL_BUILD_IDLE_POLL_S)
            try:
                device_threads.submit(build_kernels, layers, rows).result()
            except Exception as exc:  # shutting down (jobs refused or cancelled), or a oneDNN error
                logger.debug("short-batch kernels built up to %d rows only: %r", rows - 1, exc)
                return
        logger.debug("Short-batch kernels built in %.2f s.", time.perf_counter() - started)

    threading.Thread(target=build_all, name="kernel-builder", daemon=True).start()
