"""A front-end process of `--http-workers N`: the whole HTTP side in a process of its own.

With a small model on a fast GPU, one Python process cannot keep the device busy: parsing JSON,
validating, tokenizing and encoding answers for every request share its GIL with the thread that
launches batches. Front ends do all of that in parallel, each on the shared listening socket
(the kernel spreads connections over them), and send their requests' token ids to the engine
process, which batches the inputs of all front ends together.

A front end never imports torch. It serves /health with 503 until the engine has loaded the model
and said HELLO, and exits when the engine goes away.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from toolkit.api.server import serve_http
from toolkit.environment import ENGINE_SOCKET_ENV, LISTEN_FD_ENV
from toolkit.errors import ModelLoadError
from toolkit.process.bootstrap import configure_logging, exit_now, inherited_socket
from toolkit.scheduling.remote import RemoteBatcher, connect_to_engine
from toolkit.scheduling.routing import RoutingBatcher
from toolkit.scheduling.work import BatchQueue
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService
from toolkit.service.validation import RequestLimits

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)
    engine_links = [int(fd) for fd in os.environ.pop(ENGINE_SOCKET_ENV).split(",")]
    os.environ.pop(LISTEN_FD_ENV, None)
    configure_logging(args.log_level, f"front end {os.getpid()}")
    if args.listen_fd is None:
        logger.error("a front end needs the listening socket of its engine process")
        return 2
    files = args.model_files()

    def load(on_fatal: Callable[[BaseException], None]) -> InferenceService:
        links, served = _connect(engine_links)
        limits = RequestLimits(**served["limits"])
        queue: BatchQueue
        if len(links) == 1:
            queue = RemoteBatcher(links[0], on_fatal)
        else:
            engines: list[RemoteBatcher] = []

            def lost(error: BaseException) -> None:  # the front end stops with its last engine
                if not any(engine.alive for engine in engines):
                    on_fatal(error)

            engines.extend(RemoteBatcher(link, lost) for link in links)
            queue = RoutingBatcher(engines)
        return InferenceService(queue, files.tokenizer, files.spec, limits, int(served["embedding_dim"]))

    return serve_http(args, files, load, inherited_socket(args.listen_fd), exit_now)


def _connect(fds: list[int]) -> tuple[list[socket.socket], dict[str, Any]]:
    """Wait for every engine's HELLO at once; engines that fail to start are left out, and only
    if all fail is that an error."""
    with ThreadPoolExecutor(max_workers=len(fds)) as pool:
        attempts = [pool.submit(connect_to_engine, fd) for fd in fds]
    links, served, errors = [], {}, []
    for attempt in attempts:
        try:
            link, served = attempt.result()
            links.append(link)
        except ModelLoadError as exc:
            errors.append(exc)
    if not links:
        raise errors[0]
    if errors:
        logger.error("%d of %d engines did not start: serving with the others", len(errors), len(fds))
    return links, served


if __name__ == "__main__":
    sys.exit(main())
