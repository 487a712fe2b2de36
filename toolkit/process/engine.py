"""The engine process of `--http-workers N`: owns the model and the batcher, and starts N HTTP
front ends (`toolkit.process.front_end`) that share its listening socket and send it their
requests' token ids.

Start-up: with the HTTP socket bound (or launch_server_cmd's taken), bind a private Unix socket, start the
front ends (they answer /health with 503 meanwhile), load the model, then greet each front end.
SIGTERM or SIGINT: pass it on to the front ends, keep batching for them while they drain, and
stop once they have all exited (during loading: stop at once). A front end that exits otherwise
is replaced; should replacements keep exiting, or the inference worker die, the engine exits
with 1, and a front end whose engine is gone exits too: no half-alive server is left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
from collections.abc import Callable, Sequence
from types import FrameType

from toolkit.errors import ModelLoadError
from toolkit.execution.memory import prepare_process_memory
from toolkit.process.bootstrap import exit_now, settle_garbage_collector
from toolkit.process.front_ends import POLL_S, FrontEnds
from toolkit.scheduling.batch_server import BatchServer
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService
from toolkit.service.model_files import ModelFiles

logger = logging.getLogger(__name__)

_INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process ended by Ctrl+C


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived while the model was loading. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way swallows it."""


def main(args: ServerArgs, files: ModelFiles, argv: Sequence[str], http_socket: socket.socket) -> int:
    """Serve `http_socket` through the front ends until SIGTERM or a fatal error."""
    front_ends = FrontEnds(argv, http_socket, args.http_workers, args.api_key)
    logger.info("Started %d HTTP front ends: %s", args.http_workers, [p.pid for p in front_ends.processes])
    stopped_while_loading = False
    try:
        stop_requested: list[int] = []  # signals noted between the load and the event loop
        try:
            service = load_interruptibly(args, files, stop_requested)
        except StopRequested:
            logger.info("Stopped while the model was loading.")
            stopped_while_loading = True
            return 0
        except (ModelLoadError, RuntimeError, OSError) as exc:
            logger.error("loading the model failed: %s", exc)
            return 1
        settle_garbage_collector()
        served = {"limits": dataclasses.asdict(service.limits), "embedding_dim": service.embedding_dim}
        server = BatchServer(service.queue, served)
        return asyncio.run(_serve(service, server, front_ends, args.drain_timeout, stop_requested))
    finally:
        front_ends.close_unserved_links()
        front_ends.stop()
        if stopped_while_loading:
            exit_now(0)


def load_interruptibly(args: ServerArgs, files: ModelFiles, stop_requested: list[int]) -> InferenceService:
    """Load the model; until the event loop takes the signals over, a stop request interrupts
    the load (raising StopRequested), and after the load it is only noted."""
    # Imported once the front ends are started: importing torch takes seconds, while they boot.
    from toolkit.execution.assembly import load_service
    from toolkit.execution.device import pick_device

    _on_stop_signals(_raise_stop_requested)
    try:
        prepare_process_memory(pick_device(args.device).type)  # no thread of this process has started yet
        service = load_service(args, files)
    except StopRequested:
        _on_stop_signals(lambda signum, _: None)  # a second signal changes nothing now
        raise
    _on_stop_signals(lambda signum, _: stop_requested.append(signum))
    return service


def _on_stop_signals(handler: Callable[[int, FrameType | None], None]) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def _raise_stop_requested(signum: int, frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signum).name)


async def _serve(
    service: InferenceService,
    server: BatchServer,
    front_ends: FrontEnds,
    drain_timeout: float,
    stop_requested: list[int],
) -> int:
    loop = asyncio.get_running_loop()
    service.start(on_batch=server.report_batch)
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set() and signum == signal.SIGINT:  # a second Ctrl+C: stop at once
            logger.warning("Interrupted again: stopping now, with the front ends.")
            front_ends.kill()
            exit_now(_INTERRUPTED_EXIT_CODE)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if stop_requested:  # noted between the end of loading and here
        stopping.set()
    links: set[asyncio.Task[None]] = set()
    front_ends.serve_links(lambda _, link: serve_link(server, link, links))
    heartbeat = loop.create_task(server.heartbeat(lambda: service.stalled))
    logger.info("The engine is serving its HTTP front ends.")
    supervised = loop.create_task(front_ends.supervise(stopping))
    broken = loop.create_task(until_broken(service))
    signalled = loop.create_task(stopping.wait())
    await asyncio.wait({supervised, broken, signalled}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = await _wind_down(stopping, broken, front_ends, drain_timeout)
    for task in (signalled, broken, supervised, heartbeat, *links):
        task.cancel()
    await service.close()
    return exit_code


def serve_link(server: BatchServer, link: socket.socket, tasks: set[asyncio.Task[None]]) -> None:
    """Serve one front end's link on the running loop (its task kept in `tasks`)."""
    task = asyncio.get_running_loop().create_task(_serve_link(server, link))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _serve_link(server: BatchServer, link: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=link)
    await server.handle(reader, writer)


async def _wind_down(
    stopping: asyncio.Event, broken: asyncio.Task[None], front_ends: FrontEnds, drain_timeout: float
) -> int:
    """After a stop signal, let the front ends drain (exit 0); else say why the server stops (1)."""
    if stopping.is_set():
        await front_ends.drain(drain_timeout)
        return 0
    if broken.done():
        # Front ends would keep answering /health with 200 while every request fails: exit, so
        # that they lose their link and exit too, and a supervisor restarts the server.
        logger.error("the inference worker has stopped: stopping the server")
    else:
        logger.error("HTTP front ends keep exiting: stopping the server")
    return 1


async def until_broken(service: InferenceService) -> None:
    while service.alive:
        await asyncio.sleep(POLL_S)
