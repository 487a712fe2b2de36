"""The unit of work between the request side and the device side, and the queue that takes it.

`toolkit.service` turns a request into `WorkItem`s and submits them to a `BatchQueue`: the
in-process `Batcher`, or a front end's `RemoteBatcher` that forwards them to the engine process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from toolkit.scheduling.timing import RequestTiming


@dataclass(frozen=True)
class WorkItem:
    """One input: its token ids, how many leading (prompt) tokens pooling must skip, and where
    the second text of a pair starts (token type 1 from there on; 0: one text).
    The ids are a list, or an int32 array when they came from a front-end process."""

    token_ids: Sequence[int] | np.ndarray
    pool_start: int = 0
    segment_start: int = 0


ItemResult = np.ndarray | BaseException


class BatchQueue(Protocol):
    """What the service submits inputs to: the in-process `Batcher`, or a front end's
    `RemoteBatcher` that forwards them to the engine process."""

    on_batch: Callable[[int, int, float], None] | None

    @property
    def alive(self) -> bool: ...

    @property
    def engines_alive(self) -> int:
        """Engines taking work: 1 or 0, or how many of several (`--dp-size`)."""

    @property
    def stalled(self) -> bool:
        """Whether work waits and nothing progresses (a hung device, a frozen engine process)."""

    @property
    def queued_inputs(self) -> int: ...

    @property
    def queued_tokens(self) -> int: ...

    def start(self) -> None: ...

    async def close(self) -> None:
        """Stop taking work, fail what is still queued, release the device (or connection)."""

    def submit(
        self, items: Sequence[WorkItem], timing: RequestTiming | None = None
    ) -> asyncio.Future[list[np.ndarray]]: ...
