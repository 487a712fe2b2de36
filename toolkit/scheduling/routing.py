"""Several engines behind one front end (`--dp-size N`): their batchers as one `BatchQueue`.

Each request goes whole to a live engine, the one with the fewest tokens waiting: what it last
reported queued, plus what this front end has sent it and not yet had answered. An engine that is
lost fails its own waiting requests (its `RemoteBatcher` does) and gets no more; the front end
gives up only when every engine is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np

from toolkit.errors import ServiceUnavailableError
from toolkit.scheduling.remote import RemoteBatcher
from toolkit.scheduling.timing import RequestTiming
from toolkit.scheduling.work import WorkItem


class RoutingBatcher:
    def __init__(self, engines: Sequence[RemoteBatcher]) -> None:
        self.engines = list(engines)
        self._on_batch: Callable[[int, int, float], None] | None = None

    @property
    def on_batch(self) -> Callable[[int, int, float], None] | None:
        return self._on_batch

    @on_batch.setter
    def on_batch(self, hook: Callable[[int, int, float], None] | None) -> None:
        self._on_batch = hook
        for engine in self.engines:
            engine.on_batch = hook

    @property
    def alive(self) -> bool:
        return any(engine.alive for engine in self.engines)

    @property
    def stalled(self) -> bool:
        """Whether no live engine makes progress."""
        return not any(engine.alive and not engine.stalled for engine in self.engines)

    @property
    def engines_alive(self) -> int:
        return sum(engine.alive for engine in self.engines)

    @property
    def queued_inputs(self) -> int:
        return sum(engine.queued_inputs for engine in self.engines)

    @property
    def queued_tokens(self) -> int:
        return sum(engine.queued_tokens for engine in self.engines)

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self.engines))

    def submit(
        self, items: Sequence[WorkItem], timing: RequestTiming | None = None
    ) -> asyncio.Future[list[np.ndarray]]:
        live = [engine for engine in self.engines if engine.alive]
        working = [engine for engine in live if not engine.stalled] or live
        if not working:
            raise ServiceUnavailableError("the inference workers are not running")
        return min(working, key=lambda engine: engine.load).submit(items, timing)
