"""`python -m toolkit.launch_server --model-path M [--host H] [--port P] --is-embedding`."""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from toolkit.errors import ModelLoadError
from toolkit.heap import pin_mmap_threshold
from toolkit.server_args import LISTEN_FD_ENV, ServerArgs

if TYPE_CHECKING:
    from toolkit.engine import Engine
    from toolkit.startup import PreparedModel

logger = logging.getLogger("toolkit")

LOG_FORMAT = "[%(asctime)s] %(message)s"

_TORCH_THP_ENV = "THP_MEM_ALLOC_ENABLE"
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


def use_transparent_huge_pages() -> None:
    """Ask torch to back its CPU tensors of 2 MiB and more with transparent huge pages.

    With the mmap threshold pinned, every large activation was a fresh mapping whose pages fault
    in one by one; huge pages fault in 512 times fewer steps. (A CPU server now keeps its
    activations' pages instead, see `toolkit.heap`.) On the 2-core CI machine a
    32-input MiniLM batch took 1.26-1.44 s instead of 1.59-1.73 s, RSS unchanged. torch reads the
    switch once, at its first allocation, so this must run before torch is imported; a value the
    user set is kept. Where the kernel offers no huge pages, torch's madvise is a no-op.
    """
    os.environ.setdefault(_TORCH_THP_ENV, "1")


def settle_garbage_collector() -> None:
    """Once the model is loaded: keep the objects of start-up out of every later collection,
    and collect the young generation less often.

    Serving allocates a few thousand short-lived objects per batch of requests (parsed bodies,
    futures, tasks), so Python's default of a collection per 700 new objects ran one about
    every 16 requests, and the 200,000 objects of torch, the model and the web framework made
    each full collection a 110 ms pause of the event loop. In-process, through the whole app,
    collections took about 100 us of event-loop time per 8-input request; after this, next to
    none. Cyclic garbage is still collected, only in larger steps.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_YOUNG_OBJECTS_PER_COLLECTION, *gc.get_threshold()[1:])


def main(argv: Sequence[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)
    # The inherited socket is ours alone: processes we start must not see it.
    os.environ.pop(LISTEN_FD_ENV, None)
    configure_logging(args.log_level)
    pin_mmap_threshold()
    use_transparent_huge_pages()
    logger.info("server_args=%s", args.describe())

    from toolkit.startup import load_engine, prepare, prepare_process_memory

    try:
        prepared = prepare(args)
    except ModelLoadError as exc:
        logger.error("error: %s", exc)
        return 1

    if args.http_workers:
        from toolkit.engine_process import serve_with_front_ends

        return serve_with_front_ends(args, prepared, list(sys.argv[1:] if argv is None else argv))

    # torch and the model code, imported here before the server starts: imported by the loading
    # thread instead, they competed for the GIL with the event loop answering readiness polls,
    # and the first embedding came 0.2-0.4 s later (benchmarks/startup.py).
    import toolkit.runner  # noqa: F401

    prepare_process_memory(args)  # before serve_http starts the loading thread
    loaded = threading.Event()

    def load(_: Callable[[BaseException], None]) -> Engine:
        engine = load_engine(args, prepared)
        settle_garbage_collector()
        loaded.set()
        return engine

    exit_code = serve_http(args, prepared, load)
    if not loaded.is_set():  # stopped (or failed) before the model was ready
        exit_now(exit_code)
    return exit_code


def exit_now(code: int) -> NoReturn:
    """Exit without waiting for the device thread. Stopped during loading, the thread may still
    be loading, compiling or capturing CUDA graphs, and Python's exit would join it: a stopped
    server would live on for as long as that takes (until a supervisor's SIGKILL)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve_http(
    args: ServerArgs,
    prepared: PreparedModel,
    load: Callable[[Callable[[BaseException], None]], Engine],
) -> int:
    """Serve HTTP until SIGTERM or a fatal error; returns the exit code.

    `load` builds the engine in a worker thread once the socket is bound; it receives the
    function to call should serving become impossible later (the front ends' engine link)."""
    import uvicorn

    from toolkit.server.app import ServerState, create_app
    from toolkit.server.lifecycle import DrainingServer

    state = ServerState(
        args=args, model_path=str(prepared.model_dir), tokenizer_path=str(prepared.tokenizer_dir)
    )
    exit_code = 0

    def on_fatal(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app = create_app(state, lambda: load(on_fatal), on_fatal)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        log_level=args.log_level,
        # toolkit.access logs each request once, with its inputs and tokens, and keeps probes
        # at debug level; uvicorn's access log would repeat every line, probes included.
        access_log=False,
        timeout_graceful_shutdown=args.drain_timeout,
    )
    server = DrainingServer(config, state.admission, args.drain_timeout)
    sockets = [_inherited_socket(args.listen_fd)] if args.listen_fd is not None else None
    server.run(sockets=sockets)
    return exit_code


def _inherited_socket(fd: int) -> socket.socket:
    """The listening socket that launch_server_cmd bound for us and passed down."""
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    sock.listen(2048)
    return sock


if __name__ == "__main__":
    sys.exit(main())
