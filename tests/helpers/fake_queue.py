"""A `BatchQueue` with no model behind it, so the HTTP surface can be tested without torch.

Every input gets a deterministic unit vector made from its token ids and pool start, so a test
can tell that the right ids reached the queue (the same text as a string or as ids gives the
same row) and that routes shape rows faithfully; nothing here says anything about a model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import numpy as np

from toolkit.scheduling.timing import RequestTiming
from toolkit.scheduling.work import WorkItem

FAKE_DIM = 16


def fake_row(item: WorkItem, dim: int = FAKE_DIM) -> np.ndarray:
    """A unit vector that depends on every id of the input, its order and its pool start."""
    ids = np.asarray(item.token_ids, dtype=np.float64)
    phases = np.arange(1, dim + 1)[:, None] * (np.arange(len(ids)) + 1 + item.pool_start)[None, :]
    row = (np.sin(phases * 0.01) * (ids + 1)).sum(axis=1) + 1e-3
    return (row / np.linalg.norm(row)).astype(np.float32)


class FakeBatchQueue:
    """Answers each submission on the next turn of the event loop; counts what it was given."""

    def __init__(self, dim: int = FAKE_DIM, hold: bool = False) -> None:
        self.dim = dim
        self.hold = hold  # never answer: a device that has stopped
        self.futures: list[asyncio.Future[list[np.ndarray]]] = []
        self.on_batch: Callable[[int, int, float], None] | None = None
        self.submitted: list[list[WorkItem]] = []
        self.started = False
        self.closed = False

    @property
    def alive(self) -> bool:
        return self.started and not self.closed

    @property
    def stalled(self) -> bool:
        return False

    @property
    def engines_alive(self) -> int:
        return int(self.alive)

    @property
    def queued_inputs(self) -> int:
        return 0

    @property
    def queued_tokens(self) -> int:
        return 0

    def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def submit(
        self, items: Sequence[WorkItem], timing: RequestTiming | None = None
    ) -> asyncio.Future[list[np.ndarray]]:
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        self.submitted.append(list(items))
        if timing is not None:
            timing.admitted = timing.batched = time.perf_counter()
        self.futures.append(future)
        rows = [fake_row(item, self.dim) for item in items]
        if not self.hold:
            asyncio.get_running_loop().call_soon(_resolve, future, rows)
        if self.on_batch is not None and items:
            self.on_batch(len(items), sum(len(item.token_ids) for item in items), 0.0)
        return future


def _resolve(future: asyncio.Future[list[np.ndarray]], rows: list[np.ndarray]) -> None:
    if not future.done():
        future.set_result(rows)
