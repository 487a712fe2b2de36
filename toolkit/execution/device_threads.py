"""The threads that run a server's torch work: loading, warm-up and every batch.

On a GPU, one thread. On a CPU, one thread per worker, each running whole batches with the torch
thread count that `toolkit.execution.cpu_policy.ThreadPlan` gives it.

A torch thread count is an OpenMP setting of the calling thread, so each thread sets its own
before every batch, and only when it differs (a change is costly). A thread's setting starts
from the last count set by any thread, so it is never left to that. Their OpenMP teams together
should not hold more threads than there are cores: GNU OpenMP then stops letting idle workers
spin and wakes them through the kernel at every parallel region, which made lone requests several
times slower (docs/performance.md, "CPU workers"). Only the first thread ever has a team larger
than its share; when a second batch starts while the first thread's lone batch still runs on
every core, the two overlap with one thread too many until that batch ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from toolkit.execution.cpu_policy import ThreadPlan

T = TypeVar("T")

# torch's thread count when this module is first imported (by the server's main thread, before
# any device thread exists): the cores, unless OMP_NUM_THREADS says otherwise. Read once, since
# later a thread's count starts from whatever count any thread set last.
CORES = torch.get_num_threads()


class DeviceThreads:
    """`workers` threads, each running one submitted call at a time (see the module docstring)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.plan = ThreadPlan(workers, CORES)
        self._threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"device-{i}") for i in range(workers)
        ]
        self._running = [0] * workers  # submitted, not yet finished, per thread
        self._idle_since: float | None = time.monotonic()
        self._lock = threading.Lock()
        self._current = threading.local()  # index: which thread this is; released: counted free
        self._closed = False

    @property
    def idle(self) -> bool:
        """Whether no call is queued or running on any thread (always, once shut down: calls
        dropped from the queues are never counted down)."""
        with self._lock:
            return self._closed or not any(self._running)

    def idle_since(self) -> float | None:
        """When the last call finished, if none is queued or running now (time.monotonic)."""
        with self._lock:
            return self._idle_since if not any(self._running) else None

    def submit(self, fn: Callable[..., T], *args: Any, boost: bool = True) -> Future[T]:
        """Run `fn(*args)` on an idle thread, the first one first; else on the least loaded.
        `boost=False`: never on every core, even alone (one share of work split among threads,
        whose other shares may not be submitted yet)."""
        with self._lock:
            index = min(range(self.workers), key=lambda i: (self._running[i], i))
            self._running[index] += 1
        return self._threads[index].submit(self._run, index, boost, fn, *args)

    def release(self) -> None:
        """Count the calling device thread as free already, before its call returns: for work
        whose result is handed out inside the call. The next request may arrive before the call
        has returned; it should still find the first thread free, not land on a single core."""
        with self._lock:
            if not self._current.released:
                self._current.released = True
                self._running[self._current.index] -= 1
                self._idle_since = time.monotonic()

    def _run(self, index: int, boost: bool, fn: Callable[..., T], *args: Any) -> T:
        self._current.index, self._current.released = index, False
        try:
            if self.workers > 1:
                with self._lock:
                    alone = sum(self._running) == 1
                wanted = self.plan.threads_for(index, alone=alone, boost=boost)
                if torch.get_num_threads() != wanted:
                    torch.set_num_threads(wanted)
            return fn(*args)
        finally:
            self.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # Every queue is closed (and, if asked, emptied) before waiting for any running batch.
        self._closed = True
        for thread in self._threads:
            thread.shutdown(wait=False, cancel_futures=cancel_futures)
        if wait:
            for thread in self._threads:
                thread.shutdown(wait=True)
