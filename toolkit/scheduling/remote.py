"""A front end's link to the engine process: the engine's batcher as a `BatchQueue`.

`RemoteBatcher` sends each request's token ids to the engine process over its Unix socket
(`toolkit.scheduling.wire`), where `BatchServer` puts them in the one batcher shared by all front
ends, and resolves the request's future with the rows that come back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.errors import ModelLoadError, ServiceUnavailableError
from toolkit.scheduling import wire
from toolkit.scheduling.timing import RequestTiming
from toolkit.scheduling.work import WorkItem

logger = logging.getLogger(__name__)

# The engine sends a heartbeat every second; this long without any frame, it counts as stalled.
SILENCE_S = 5.0


@dataclass
class _Waiting:
    future: asyncio.Future[list[np.ndarray]]
    timing: RequestTiming | None


class RemoteBatcher:
    """The engine's batcher as seen from a front end: the `BatchQueue` the front end's service
    submits to. `on_batch` hears of every batch the engine runs, for any front end; the queue
    counts are the engine's, as of its last batch."""

    on_batch: Callable[[int, int, float], None] | None = None

    def __init__(self, connected: socket.socket, on_lost: Callable[[BaseException], None]) -> None:
        self._socket = connected
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Waiting] = {}
        self._outbox: list[bytes] = []  # frames submitted before the connection's stream is up
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._open = True
        self.queued_inputs = 0  # the engine's, as of its last BATCH report
        self.queued_tokens = 0
        self._last_frame = time.monotonic()
        self._engine_stalled = False
        self._sent_tokens: dict[int, int] = {}  # per request sent and not yet answered

    @property
    def alive(self) -> bool:
        return self._open

    @property
    def engines_alive(self) -> int:
        return int(self._open)

    @property
    def load(self) -> int:
        """Tokens waiting on the engine, as far as this front end knows: its last report of its
        queue, and what this front end sent since and has not had answered."""
        return self.queued_tokens + sum(self._sent_tokens.values())

    @property
    def stalled(self) -> bool:
        """Whether the engine says its batches stalled, or has sent nothing (not even its
        heartbeat) for `SILENCE_S`: a frozen engine process."""
        return self._engine_stalled or time.monotonic() - self._last_frame > SILENCE_S

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._receive(), name="engine-link")

    async def close(self) -> None:
        self._open = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
        self._fail_waiting(ServiceUnavailableError("the server is shutting down"))

    def submit(
        self, items: Sequence[WorkItem], timing: RequestTiming | None = None
    ) -> asyncio.Future[list[np.ndarray]]:
        if not self._open:
            raise ServiceUnavailableError("the inference worker is not running")
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        if not items:
            future.set_result([])
            return future
        request_id = next(self._ids)
        self._waiting[request_id] = _Waiting(future, timing)
        self._sent_tokens[request_id] = sum(len(item.token_ids) for item in items)
        self._send(wire.encode_submit(request_id, items))
        if timing is not None:
            timing.admitted = time.perf_counter()
        future.add_done_callback(lambda done: self._settled(request_id, done))
        return future

    def _send(self, data: bytes) -> None:
        if self._writer is None:
            self._outbox.append(data)
        else:
            self._writer.write(data)

    def _settled(self, request_id: int, future: asyncio.Future[list[np.ndarray]]) -> None:
        waiting = self._waiting.pop(request_id, None)
        self._sent_tokens.pop(request_id, None)
        if waiting is not None and future.cancelled() and self._open:
            self._send(wire.frame(wire.CANCEL, request_id))  # the client left: the engine withdraws

    async def _receive(self) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(sock=self._socket)
            for data in self._outbox:
                self._writer.write(data)
            self._outbox.clear()
            while True:
                self._deliver(await wire.read_frame(reader))
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            lost: BaseException = exc
        except Exception as exc:  # a malformed frame: the link cannot be trusted any more
            logger.exception("the engine link failed")
            lost = exc
        self._open = False
        logger.error("lost the link to an engine process (%r)", lost)
        self._fail_waiting(ServiceUnavailableError("the inference worker is not running"))
        self._on_lost(lost)

    def _deliver(self, frame: wire.Frame) -> None:
        self._last_frame = time.monotonic()
        if frame.kind == wire.LIVE:
            self._engine_stalled = wire.decode_live(frame.body)
            return
        if frame.kind == wire.BATCH:
            self._take_report(wire.decode_batch(frame.body))
            return
        waiting = self._waiting.get(frame.request_id)
        if waiting is None or waiting.future.done():
            return  # answered after its client left
        if frame.kind == wire.RESULT:
            result = wire.decode_result(frame.body)
            timing = waiting.timing
            if timing is not None and timing.admitted is not None:
                # The engine's own queue time; "inference" then also holds both socket hops.
                timing.batched = timing.admitted + result.queue_s
            waiting.future.set_result(result.rows)
        elif frame.kind == wire.ERROR:
            waiting.future.set_exception(wire.decode_error(frame.body))

    def _take_report(self, report: wire.BatchReport) -> None:
        self.queued_inputs, self.queued_tokens = report.queued_inputs, report.queued_tokens
        if self.on_batch is not None:
            self.on_batch(report.inputs, report.tokens, report.seconds)

    def _fail_waiting(self, error: Exception) -> None:
        for waiting in list(self._waiting.values()):
            if not waiting.future.done():
                waiting.future.set_exception(error)


def connect_to_engine(fd: int) -> tuple[socket.socket, dict[str, object]]:
    """Wait (blocking) on the inherited link `fd` for the engine's HELLO, which comes once its
    model is loaded."""
    try:
        link = socket.socket(fileno=fd)
    except OSError as exc:
        raise ModelLoadError(f"no link to the engine process on descriptor {fd}: {exc}") from exc
    os.set_inheritable(fd, False)
    header = _receive_exactly(link, wire.HEADER.size)
    length, kind, _ = wire.HEADER.unpack(header)
    body = _receive_exactly(link, length)
    if kind != wire.HELLO:
        raise ModelLoadError(f"the engine process opened with frame kind {kind!r}, not HELLO")
    return link, wire.decode_hello(body)


def _receive_exactly(link: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        try:
            chunk = link.recv(left)
        except OSError:  # reset: the engine closed its socket (a failed load, a stop)
            chunk = b""
        if not chunk:
            raise ModelLoadError("the engine process exited before it was ready")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
