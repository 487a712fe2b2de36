"""The engine process of `--http-workers N`: owns the model and the batcher, and starts N HTTP
front ends (`toolkit.frontend`) that share its listening socket and send it their requests.

Start-up: bind the HTTP socket (or take launch_server_cmd's) and a private Unix socket, start the
front ends (they answer /health with 503 meanwhile), load the model, then greet each front end.
SIGTERM or SIGINT: pass it on to the front ends, keep batching for them while they drain, and
stop once they have all exited. Should every front end die on its own, the engine exits with 1,
and a front end whose engine is gone exits too: no half-alive server is left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from toolkit.batch_service import BatchService
from toolkit.errors import ModelLoadError
from toolkit.frontend import ENGINE_SOCKET_ENV
from toolkit.server_args import LISTEN_FD_ENV, ServerArgs
from toolkit.startup import PreparedModel

logger = logging.getLogger(__name__)

_POLL_S = 0.2
_KILL_GRACE_S = 5.0


def serve_with_front_ends(args: ServerArgs, prepared: PreparedModel, argv: Sequence[str]) -> int:
    from toolkit.launch_server import settle_garbage_collector
    from toolkit.startup import load_engine

    http_socket = _http_socket(args)
    link_dir = tempfile.mkdtemp(prefix="toolkit-engine-")
    link_path = os.path.join(link_dir, "engine.sock")
    link_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    link_socket.bind(link_path)
    link_socket.listen(max(16, args.http_workers))
    front_ends = [_start_front_end(argv, http_socket, link_path) for _ in range(args.http_workers)]
    http_socket.close()  # the front ends hold it now
    logger.info("Started %d HTTP front ends: %s", len(front_ends), [p.pid for p in front_ends])
    try:
        try:
            engine = load_engine(args, prepared)
        except (ModelLoadError, RuntimeError, OSError) as exc:
            logger.error("loading the model failed: %s", exc)
            return 1
        settle_garbage_collector()
        served = {"limits": dataclasses.asdict(engine.limits), "embedding_dim": engine.embedding_dim}
        service = BatchService(engine.batcher, served)
        return asyncio.run(_serve(service, link_socket, front_ends, args.drain_timeout))
    finally:
        _stop(front_ends)
        link_socket.close()
        shutil.rmtree(link_dir, ignore_errors=True)


async def _serve(
    service: BatchService,
    link_socket: socket.socket,
    front_ends: list[subprocess.Popen[bytes]],
    drain_timeout: float,
) -> int:
    loop = asyncio.get_running_loop()
    service.batcher.start()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = await asyncio.start_unix_server(service.handle, sock=link_socket)
    logger.info("The engine is serving its HTTP front ends.")
    exits = loop.create_task(_all_exited(front_ends))
    signalled = loop.create_task(stopping.wait())
    await asyncio.wait({exits, signalled}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if stopping.is_set():
        for process in front_ends:  # harmless if they got the signal already (a process group's)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exits), drain_timeout + _KILL_GRACE_S)
        except TimeoutError:
            logger.error("HTTP front ends still running after the drain timeout: killing them")
    else:
        logger.error("every HTTP front end has exited: stopping")
        exit_code = 1
    signalled.cancel()
    exits.cancel()
    server.close()
    await service.batcher.close()
    return exit_code


async def _all_exited(front_ends: list[subprocess.Popen[bytes]]) -> None:
    reported: set[int] = set()
    while True:
        for process in front_ends:
            code = process.poll()
            if code is not None and process.pid not in reported:
                reported.add(process.pid)
                if code != 0:
                    logger.error("HTTP front end %d exited with code %d", process.pid, code)
        if len(reported) == len(front_ends):
            return
        await asyncio.sleep(_POLL_S)


def _http_socket(args: ServerArgs) -> socket.socket:
    if args.listen_fd is not None:
        from toolkit.launch_server import _inherited_socket

        return _inherited_socket(args.listen_fd)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    return socket.create_server((args.host, args.port), family=family, backlog=2048)


def _start_front_end(argv: Sequence[str], http_socket: socket.socket, link_path: str) -> subprocess.Popen[bytes]:
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
    for process in front_ends:
        try:
            process.wait(timeout=_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
