"""The engine process of `--http-workers N`: owns the model and the batcher, and starts N HTTP
front ends (`toolkit.frontend`) that share its listening socket and send it their requests.

Start-up: bind the HTTP socket (or take launch_server_cmd's) and a private Unix socket, start the
front ends (they answer /health with 503 meanwhile), load the model, then greet each front end.
SIGTERM or SIGINT: pass it on to the front ends, keep batching for them while they drain, and
stop once they have all exited (during loading: stop at once). A front end that exits otherwise
is replaced; should replacements keep exiting, or the inference worker die, the engine exits
with 1, and a front end whose engine is gone exits too: no half-alive server is left behind.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import FrameType

from toolkit.batch_service import BatchService
from toolkit.errors import ModelLoadError
from toolkit.frontend import ENGINE_SOCKET_ENV
from toolkit.server_args import LISTEN_FD_ENV, ServerArgs
from toolkit.startup import PreparedModel
from toolkit.work import BatchQueue

logger = logging.getLogger(__name__)

_POLL_S = 0.2
_KILL_GRACE_S = 5.0
# A front end that exits is replaced, up to this many times per front end within the window;
# past that they are failing for good (a bad flag, a broken install) and the server stops.
_RESTARTS_PER_WINDOW = 3
_RESTART_WINDOW_S = 60.0


class _StopRequested(BaseException):
    """SIGTERM or SIGINT arrived while the model was loading. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way swallows it."""


def serve_with_front_ends(args: ServerArgs, prepared: PreparedModel, argv: Sequence[str]) -> int:
    from toolkit.launch_server import exit_now, settle_garbage_collector
    from toolkit.startup import load_engine, prepare_process_memory

    try:
        http_socket = _http_socket(args)
    except OSError as exc:
        logger.error("error: cannot listen on %s:%d: %s", args.host, args.port, exc.strerror or exc)
        return 1
    link_dir = tempfile.mkdtemp(prefix="toolkit-engine-")
    link_path = os.path.join(link_dir, "engine.sock")
    link_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    link_socket.bind(link_path)
    link_socket.listen(max(16, args.http_workers))
    # The engine keeps the listening socket (it never accepts on it) to start replacements.
    start_front_end = functools.partial(_start_front_end, argv, http_socket, link_path)
    front_ends = [start_front_end() for _ in range(args.http_workers)]
    logger.info("Started %d HTTP front ends: %s", len(front_ends), [p.pid for p in front_ends])
    stop_requested: list[int] = []  # signals noted between the load and the event loop
    stopped_while_loading = False
    try:
        # Until the event loop takes the signals over, a stop request interrupts the load.
        _on_stop_signals(_raise_stop_requested)
        try:
            prepare_process_memory(args)  # no thread of this process has started yet
            engine = load_engine(args, prepared)
            _on_stop_signals(lambda signum, _: stop_requested.append(signum))
        except _StopRequested:
            _on_stop_signals(lambda signum, _: None)  # a second signal changes nothing now
            logger.info("Stopped while the model was loading.")
            stopped_while_loading = True
            return 0
        except (ModelLoadError, RuntimeError, OSError) as exc:
            logger.error("loading the model failed: %s", exc)
            return 1
        settle_garbage_collector()
        served = {"limits": dataclasses.asdict(engine.limits), "embedding_dim": engine.embedding_dim}
        service = BatchService(engine.batcher, served)
        return asyncio.run(
            _serve(service, link_socket, front_ends, start_front_end, args.drain_timeout, stop_requested)
        )
    finally:
        link_socket.close()  # front ends still waiting for HELLO see the engine gone
        _stop(front_ends)
        http_socket.close()
        shutil.rmtree(link_dir, ignore_errors=True)
        if stopped_while_loading:
            exit_now(0)


def _on_stop_signals(handler: Callable[[int, FrameType | None], None]) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def _raise_stop_requested(signum: int, frame: FrameType | None) -> None:
    raise _StopRequested(signal.Signals(signum).name)


async def _serve(
    service: BatchService,
    link_socket: socket.socket,
    front_ends: list[subprocess.Popen[bytes]],
    start_front_end: Callable[[], subprocess.Popen[bytes]],
    drain_timeout: float,
    stop_requested: list[int],
) -> int:
    loop = asyncio.get_running_loop()
    service.batcher.start()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if stop_requested:  # noted between the end of loading and here
        stopping.set()
    server = await asyncio.start_unix_server(service.handle, sock=link_socket)
    logger.info("The engine is serving its HTTP front ends.")
    supervised = loop.create_task(_supervise(front_ends, start_front_end, stopping))
    broken = loop.create_task(_broken(service.batcher))
    signalled = loop.create_task(stopping.wait())
    await asyncio.wait({supervised, broken, signalled}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if stopping.is_set():
        for process in front_ends:  # harmless if they got the signal already (a process group's)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(_all_exited(front_ends), drain_timeout + _KILL_GRACE_S)
        except TimeoutError:
            logger.error("HTTP front ends still running after the drain timeout: killing them")
    elif broken.done():
        # Front ends would keep answering /health with 200 while every request fails: exit, so
        # that they lose their link and exit too, and a supervisor restarts the server.
        logger.error("the inference worker has stopped: stopping the server")
        exit_code = 1
    else:
        logger.error("HTTP front ends keep exiting: stopping the server")
        exit_code = 1
    for task in (signalled, broken, supervised):
        task.cancel()
    server.close()
    await service.batcher.close()
    return exit_code


async def _broken(batcher: BatchQueue) -> None:
    while batcher.alive:
        await asyncio.sleep(_POLL_S)


async def _supervise(
    front_ends: list[subprocess.Popen[bytes]],
    start_front_end: Callable[[], subprocess.Popen[bytes]],
    stopping: asyncio.Event,
) -> None:
    """Replace any front end that exits while the server is not stopping (a crash, an OOM kill);
    return, to stop the server, once replacements keep exiting too."""
    restarts: collections.deque[float] = collections.deque()
    while True:
        for index, process in enumerate(front_ends):
            code = process.poll()
            if code is None or stopping.is_set():
                continue
            now = time.monotonic()
            while restarts and now - restarts[0] > _RESTART_WINDOW_S:
                restarts.popleft()
            if len(restarts) >= _RESTARTS_PER_WINDOW * len(front_ends):
                return
            restarts.append(now)
            front_ends[index] = start_front_end()
            logger.error(
                "HTTP front end %d exited with code %d: started %d instead",
                process.pid,
                code,
                front_ends[index].pid,
            )
        await asyncio.sleep(_POLL_S)


async def _all_exited(front_ends: list[subprocess.Popen[bytes]]) -> None:
    while any(process.poll() is None for process in front_ends):
        await asyncio.sleep(_POLL_S)


def _http_socket(args: ServerArgs) -> socket.socket:
    if args.listen_fd is not None:
        from toolkit.launch_server import _inherited_socket

        return _inherited_socket(args.listen_fd)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    return socket.create_server((args.host, args.port), family=family, backlog=2048)


def _start_front_end(
    argv: Sequence[str], http_socket: socket.socket, link_path: str
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env[LISTEN_FD_ENV] = str(http_socket.fileno())
    env[ENGINE_SOCKET_ENV] = link_path
    return subprocess.Popen(
        [sys.executable, "-m", "toolkit.frontend", *argv], env=env, pass_fds=(http_socket.fileno(),)
    )


def _stop(front_ends: list[subprocess.Popen[bytes]]) -> None:
    """Make sure no front end outlives the engine (after a failed start, say)."""
    for process in front_ends:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + _KILL_GRACE_S
    for process in front_ends:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
