"""What every server process does the same way: logging, the garbage collector's settings once
the model is loaded, the listening socket, and a prompt exit."""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from typing import NoReturn

from toolkit.server_args import ServerArgs

LOG_FORMAT = "[%(asctime)s] %(message)s"

_YOUNG_OBJECTS_PER_COLLECTION = 10_000  # Python's default is 700


def configure_logging(level: str, process_name: str | None = None) -> None:
    """Log to stdout; `process_name` tags the lines of a process that is not the main one."""
    log_format = LOG_FORMAT if process_name is None else f"[%(asctime)s {process_name}] %(message)s"
    logging.basicConfig(
        level=level.upper(), format=log_format, datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stdout
    )
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True


def settle_garbage_collector() -> None:
    """Once the model is loaded: keep the objects of start-up out of every later collection, and
    collect the young generation less often.

    Serving allocates a few thousand short-lived objects per batch of requests, so Python's
    default collected about every 16 requests, and the objects of torch, the model and the web
    framework made each full collection a long pause of the event loop. Cyclic garbage is still
    collected, only in larger steps."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_YOUNG_OBJECTS_PER_COLLECTION, *gc.get_threshold()[1:])


def exit_now(code: int) -> NoReturn:
    """Exit without waiting for the device thread. Stopped during loading, the thread may still
    be loading, compiling or capturing CUDA graphs, and Python's exit would join it: a stopped
    server would live on for as long as that takes (until a supervisor's SIGKILL)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def inherited_socket(fd: int) -> socket.socket:
    """The listening socket that launch_server_cmd (or the engine process) bound and passed down."""
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    sock.listen(2048)
    return sock


def listening_socket(args: ServerArgs) -> socket.socket:
    """The inherited socket, else a new one bound to --host and --port; raises OSError."""
    if args.listen_fd is not None:
        return inherited_socket(args.listen_fd)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    return socket.create_server((args.host, args.port), family=family, backlog=2048)
