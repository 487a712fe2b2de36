"""One engine process of `--dp-size N`: loads the model on its own device and serves the links of
the front ends, which the supervisor (`toolkit.process.data_parallel`) hands it over its control
socket as they start.

Once loaded, it stops when its control socket closes: the supervisor closes it after the front
ends have drained, and it closes by itself if the supervisor dies. SIGTERM and SIGINT, which a
terminal or `terminate_process` send the whole process group, are left to the supervisor: an
engine that stopped at once would fail the requests the front ends are draining. While loading, a
signal stops it at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from toolkit.environment import CONTROL_SOCKET_ENV, ENGINE_INDEX_ENV
from toolkit.errors import ModelLoadError
from toolkit.execution.memory import pin_mmap_threshold, use_transparent_huge_pages
from toolkit.process.bootstrap import configure_logging, exit_now, settle_garbage_collector
from toolkit.process.engine import StopRequested, load_interruptibly, serve_link, until_broken
from toolkit.scheduling.batch_server import BatchServer
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService

logger = logging.getLogger(__name__)

_MAX_LINKS_PER_MESSAGE = 64


def main(argv: Sequence[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)
    control = socket.socket(fileno=int(os.environ.pop(CONTROL_SOCKET_ENV)))
    index = os.environ.pop(ENGINE_INDEX_ENV, "?")
    configure_logging(args.log_level, f"engine {index}")
    pin_mmap_threshold()
    use_transparent_huge_pages()  # before torch is imported
    stop_requested: list[int] = []
    try:
        service = load_interruptibly(args, args.model_files(), stop_requested)
    except StopRequested:
        logger.info("Stopped while the model was loading.")
        exit_now(0)
    except (ModelLoadError, RuntimeError, OSError) as exc:
        logger.error("loading the model failed: %s", exc)
        return 1
    settle_garbage_collector()
    served = {"limits": dataclasses.asdict(service.limits), "embedding_dim": service.embedding_dim}
    # A stop asked after the load is the supervisor's to carry out, by closing the control socket.
    return asyncio.run(_serve(service, BatchServer(service.queue, served), control))


async def _serve(service: InferenceService, server: BatchServer, control: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    service.start(on_batch=server.report_batch)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: None)  # the supervisor decides, by the control socket
    links: set[asyncio.Task[None]] = set()
    control.setblocking(False)
    loop.add_reader(control, _take_links, control, server, links, stopping)
    heartbeat = loop.create_task(server.heartbeat(lambda: service.stalled))
    broken, signalled = loop.create_task(until_broken(service)), loop.create_task(stopping.wait())
    await asyncio.wait({broken, signalled}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0 if stopping.is_set() else 1
    if exit_code:
        logger.error("the inference worker has stopped: stopping this engine")
    loop.remove_reader(control)
    for task in (heartbeat, broken, signalled, *links):
        task.cancel()
    await service.close()
    return exit_code


def _take_links(
    control: socket.socket, server: BatchServer, links: set[asyncio.Task[None]], stopping: asyncio.Event
) -> None:
    """Serve the links the supervisor sent; its end closing means the server is stopping."""
    try:
        message, fds, _, _ = socket.recv_fds(control, 1024, _MAX_LINKS_PER_MESSAGE)
    except BlockingIOError:
        return
    except OSError:
        message, fds = b"", []
    for fd in fds:
        serve_link(server, socket.socket(fileno=fd), links)
    if not message:
        stopping.set()


if __name__ == "__main__":
    sys.exit(main())
