"""The threads that run a server's torch work: loading, warm-up and every batch.

On a GPU, one thread. On a CPU, one thread per worker (`--cpu-workers`), each running whole
batches with its share of torch's threads (the cores, unless OMP_NUM_THREADS says otherwise). A
forward's many short parallel regions keep one core waiting for the other at every barrier, and
whatever else the server does on a core stalls both: on 2 cores, two single-threaded forwards
side by side embedded 1.3x the tokens per second of one forward on both (MiniLM, in-process),
and the server at 32 clients 1.08–1.23x (`benchmarks/serve.py`, alternating runs). A lone short
batch still gets every core: with a share of one thread each, the first thread runs a batch on
all of them when no other batch is running (a few tokens' forward is bound by reading the
weights, which both cores then share). Larger work is shared among the workers instead, and
with several cores per worker all work is (`toolkit.runner.Runner.work_split`).
On a 16-core Xeon (MiniLM's shape, alternating runs), 4 workers of 4 threads served 1.24–1.33x
the tokens of one worker at 8 and 32 clients and 0.96–1.11x at one; on 8 of its cores, 2 workers
1.01–1.49x and 1.15–1.27x, and 0.91–1.02x at one client. But an input that cannot be split
runs on one worker's share: a lone 400–512-token text took 48–51 ms with 4 workers against 23
with one, so larger machines default to one worker (`--cpu-workers` opts in).

A torch thread count is an OpenMP setting of the calling thread, so each thread sets its own
before every batch, and only when it differs (a change cost ~10 ms). A thread's setting starts
from the last count set by any thread, so it is never left to that. Their OpenMP teams together
should not hold more threads than there are cores: GNU OpenMP then stops letting idle workers
spin and wakes them through the kernel at every parallel region. On 2 cores, a model warmed up
on one thread with a team of 2 and served on another with a team of 2 took three times as long
per lone request (a tiny BERT's forward went from 1.6 to 5.1 ms). Only the first thread ever has
a team larger than its share; when a second batch starts while the first thread's lone batch
still runs on every core, the two overlap with one thread too many until that batch ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# torch's thread count when this module is first imported (by the server's main thread, before
# any device thread exists): the cores, unless OMP_NUM_THREADS says otherwise. Read once, since
# later a thread's count starts from whatever count any thread set last.
CORES = torch.get_num_threads()


class DeviceThreads:
    """`workers` threads, each running one submitted call at a time (see the module docstring)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._share = max(1, CORES // workers)
        # The first thread's count for a batch that runs alone: every core, but only where the
        # share is one thread, or the teams would exceed the cores for good (module docstring).
        self._lone = CORES if self._share == 1 else self._share
        self._threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"device-{i}") for i in range(workers)
        ]
        self._running = [0] * workers  # submitted, not yet finished, per thread
        self._lock = threading.Lock()
        self._current = threading.local()  # index: which thread this is; released: counted free
        self._closed = False

    @property
    def boosts_lone_batches(self) -> bool:
        """Whether the first thread runs a batch that is alone on every core (one core per
        worker only). Larger work is shared among the threads instead (`toolkit.batcher`)."""
        return self._lone > self._share

    @property
    def idle(self) -> bool:
        """Whether no call is queued or running on any thread (always, once shut down: calls
        dropped from the queues are never counted down)."""
        with self._lock:
            return self._closed or not any(self._running)

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

    def _run(self, index: int, boost: bool, fn: Callable[..., T], *args: Any) -> T:
        self._current.index, self._current.released = index, False
        try:
            if self.workers > 1:
                with self._lock:
                    alone = sum(self._running) == 1
                wanted = self._lone if boost and alone and index == 0 else self._share
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
