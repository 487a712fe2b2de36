"""HTTP front-end processes (`--http-workers N`): the whole HTTP side in processes of its own.

With a small model on a fast GPU, one Python process cannot keep the device busy: parsing JSON,
validating, tokenizing and encoding answers for every request share its GIL with the thread that
launches batches. Front ends do all of that in parallel, each on the shared listening socket
(the kernel spreads connections over them), and send their requests' token ids to the engine
process, which batches the inputs of all front ends together (see `toolkit.batch_service`).

A front end never imports torch. It serves /health with 503 until the engine has loaded the model
and said HELLO, and exits when the engine goes away.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toolkit import ipc
from toolkit.errors import ModelLoadError, ServiceUnavailableError
from toolkit.metrics import RequestTiming
from toolkit.work import WorkItem

logger = logging.getLogger(__name__)

# How the engine process tells a front end where to reach it.
ENGINE_SOCKET_ENV = "TOOLKIT_ENGINE_SOCKET"


@dataclass
class _Waiting:
    future: asyncio.Future[list[np.ndarray]]
    timing: RequestTiming | None


class RemoteBatcher:
    """The engine's batcher as seen from a front end: the `BatchQueue` the front end's Engine
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

    @property
    def alive(self) -> bool:
        return self._open

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
        self._send(ipc.encode_submit(request_id, items))
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
        if waiting is not None and future.cancelled() and self._open:
            self._send(ipc.frame(ipc.CANCEL, request_id))  # the client left: the engine withdraws

    async def _receive(self) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(sock=self._socket)
            for data in self._outbox:
                self._writer.write(data)
            self._outbox.clear()
            while True:
                self._deliver(await ipc.read_frame(reader))
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            lost: BaseException = exc
        except Exception as exc:  # a malformed frame: the link cannot be trusted any more
            logger.exception("the engine link failed")
            lost = exc
        self._open = False
        logger.error("lost the engine process (%r): this front end stops", lost)
        self._fail_waiting(ServiceUnavailableError("the inference worker is not running"))
        self._on_lost(lost)

    def _deliver(self, frame: ipc.Frame) -> None:
        if frame.kind == ipc.BATCH:
            self._take_report(ipc.decode_batch(frame.body))
            return
        waiting = self._waiting.get(frame.request_id)
        if waiting is None or waiting.future.done():
            return  # answered after its client left
        if frame.kind == ipc.RESULT:
            result = ipc.decode_result(frame.body)
            timing = waiting.timing
            if timing is not None and timing.admitted is not None:
                # The engine's own queue time; "inference" then also holds both socket hops.
                timing.batched = timing.admitted + result.queue_s
            waiting.future.set_result(result.rows)
        elif frame.kind == ipc.ERROR:
            waiting.future.set_exception(ipc.decode_error(frame.body))

    def _take_report(self, report: ipc.BatchReport) -> None:
        self.queued_inputs, self.queued_tokens = report.queued_inputs, report.queued_tokens
        if self.on_batch is not None:
            self.on_batch(report.inputs, report.tokens, report.seconds)

    def _fail_waiting(self, error: Exception) -> None:
        for waiting in list(self._waiting.values()):
            if not waiting.future.done():
                waiting.future.set_exception(error)


def connect_to_engine(path: str) -> tuple[socket.socket, dict[str, object]]:
    """Connect and wait (blocking) for the engine's HELLO, which comes once its model is loaded."""
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        link.connect(path)
    except OSError as exc:
        link.close()
        raise ModelLoadError(f"cannot reach the engine process at {path}: {exc}") from exc
    header = _receive_exactly(link, ipc.HEADER.size)
    length, kind, _ = ipc.HEADER.unpack(header)
    body = _receive_exactly(link, length)
    if kind != ipc.HELLO:
        raise ModelLoadError(f"the engine process opened with frame kind {kind!r}, not HELLO")
    return link, ipc.decode_hello(body)


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


def main(argv: Sequence[str] | None = None) -> int:
    from toolkit.engine import Engine, EngineLimits
    from toolkit.launch_server import configure_logging, serve_http
    from toolkit.server_args import LISTEN_FD_ENV, ServerArgs
    from toolkit.startup import prepare

    args = ServerArgs.from_cli(argv)
    engine_socket = os.environ.pop(ENGINE_SOCKET_ENV)
    os.environ.pop(LISTEN_FD_ENV, None)
    configure_logging(args.log_level, f"front end {os.getpid()}")
    if args.listen_fd is None:
        logger.error("a front end needs the listening socket of its engine process")
        return 2
    prepared = prepare(args)

    def load(on_fatal: Callable[[BaseException], None]) -> Engine:
        link, served = connect_to_engine(engine_socket)
        limits = EngineLimits(**served["limits"])  # type: ignore[arg-type]
        batcher = RemoteBatcher(link, on_fatal)
        return Engine(batcher, prepared.tokenizer, prepared.spec, limits, int(served["embedding_dim"]))  # type: ignore[call-overload]

    return serve_http(args, prepared, load)


if __name__ == "__main__":
    sys.exit(main())
