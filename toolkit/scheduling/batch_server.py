"""The engine process's end of `toolkit.scheduling.wire`: HTTP front ends submit their requests'
inputs to the one Batcher over a Unix socket.

Each connection first gets a HELLO (what the engine serves: limits, embedding size), then may
send SUBMIT and CANCEL frames; every SUBMIT is answered by one RESULT or ERROR. A connection that
closes withdraws its requests still queued: their clients are gone with their front end. Every
finished batch is reported to every front end (BATCH), so that each one's /metrics shows the
engine's batches and queue whichever front end a scrape reaches.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from toolkit.scheduling import wire
from toolkit.scheduling.timing import RequestTiming
from toolkit.scheduling.work import BatchQueue

logger = logging.getLogger(__name__)

_Pending = dict[int, asyncio.Future[list[np.ndarray]]]

HEARTBEAT_S = 1.0


class BatchServer:
    def __init__(self, batcher: BatchQueue, served: dict[str, Any]) -> None:
        self.batcher = batcher
        self.served = served
        self._front_ends: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one front end until it disconnects."""
        writer.write(wire.encode_hello(self.served))
        self._front_ends.add(writer)
        pending: _Pending = {}
        try:
            while True:
                frame = await wire.read_frame(reader)
                if frame.kind == wire.SUBMIT:
                    self._submit(frame, writer, pending)
                elif frame.kind == wire.CANCEL:
                    future = pending.pop(frame.request_id, None)
                    if future is not None:
                        future.cancel()  # withdraws the inputs still queued
                else:
                    logger.error("a front end sent a frame of unknown kind %r: closing it", frame.kind)
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front end exited
        finally:
            self._front_ends.discard(writer)
            for future in pending.values():
                future.cancel()
            writer.close()

    async def heartbeat(self, stalled: Callable[[], bool], every_s: float = HEARTBEAT_S) -> None:
        """Tell every front end, every second, that this engine runs and whether it progresses."""
        while True:
            data = wire.encode_live(stalled())
            for writer in self._front_ends:
                if not writer.is_closing():
                    writer.write(data)
            await asyncio.sleep(every_s)

    def report_batch(self, inputs: int, tokens: int, seconds: float) -> None:
        """The batcher's `on_batch`: tell every front end of a finished batch."""
        report = wire.BatchReport(
            inputs, tokens, seconds, self.batcher.queued_inputs, self.batcher.queued_tokens
        )
        data = wire.encode_batch(report)
        for writer in self._front_ends:
            if not writer.is_closing():
                writer.write(data)

    def _submit(self, frame: wire.Frame, writer: asyncio.StreamWriter, pending: _Pending) -> None:
        timing = RequestTiming()
        try:
            items = wire.decode_submit(frame.body)
            future = self.batcher.submit(items, timing)
        except Exception as exc:  # refused (queue full, worker gone) or a malformed frame
            writer.write(wire.encode_error(frame.request_id, exc))
            return
        pending[frame.request_id] = future
        future.add_done_callback(functools.partial(_answer, frame.request_id, writer, pending, timing))


def _answer(
    request_id: int,
    writer: asyncio.StreamWriter,
    pending: _Pending,
    timing: RequestTiming,
    future: asyncio.Future[list[np.ndarray]],
) -> None:
    pending.pop(request_id, None)
    if future.cancelled() or writer.is_closing():
        return
    error = future.exception()
    if error is not None:
        writer.write(wire.encode_error(request_id, error))
        return
    now = time.perf_counter()
    admitted = timing.admitted if timing.admitted is not None else now
    batched = timing.batched if timing.batched is not None else now
    writer.write(wire.encode_result(request_id, future.result(), batched - admitted))
