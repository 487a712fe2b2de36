"""What every server process does the same way: logging, the garbage collector's settings once
the model is loaded, the listening socket, watching the process that launched it, and a prompt
exit."""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

import psutil

from toolkit.server_args import ServerArgs

logger = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s] %(message)s"

_YOUNG_OBJECTS_PER_COLLECTION = 10_000  # Python's default is 700
_PARENT_POLL_S = 0.5


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


def bind_error(args: ServerArgs, exc: OSError) -> str:
    """One line for a socket that could not be bound, naming the holder of a taken port."""
    where = f"{args.host}:{args.port}"
    if exc.errno != errno.EADDRINUSE:
        return f"cannot listen on {where}: {exc.strerror or exc}"
    holder = _port_holder(args.port)
    held = f" (held by {holder})" if holder else ""
    return f"cannot listen on {where}: the port is already in use{held}; stop that server or pass --port"


def _port_holder(port: int) -> str | None:
    """`pid N (command)` of the process listening on `port`, where this user may see it."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
            if connection.pid is None:
                return None
            try:
                command = " ".join(psutil.Process(connection.pid).cmdline()[:4])
            except psutil.Error:
                command = "?"
            return f"pid {connection.pid}: {command}"
    return None


def stop_with_parent(parent: str) -> None:
    """SIGTERM this process (a drain, then exit) once the process `parent` names is gone: a
    server that `launch_server_cmd` started must not outlive the notebook kernel, even one
    killed with SIGKILL. `parent` is "PID:START_TIME", so that a reused pid does not count."""
    pid_text, _, started_text = parent.partition(":")
    try:
        pid, started = int(pid_text), float(started_text)
    except ValueError:
        logger.warning("ignoring a malformed parent %r", parent)
        return
    threading.Thread(target=_watch_parent, args=(pid, started), name="parent-watch", daemon=True).start()


def _watch_parent(pid: int, started: float) -> None:
    while _alive(pid, started):
        time.sleep(_PARENT_POLL_S)
    logger.info("The process that launched this server (pid %d) is gone: stopping.", pid)
    os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int, started: float) -> bool:
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def without_flags(argv: Sequence[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` less these flags and their values (`--flag V` or `--flag=V`)."""
    kept: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        elif not word.startswith(tuple(f"{flag}=" for flag in flags)):
            kept.append(word)
    return kept
