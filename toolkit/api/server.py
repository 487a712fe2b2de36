"""Serve the HTTP app with uvicorn until SIGTERM (with its drain) or a fatal error."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import NoReturn

import uvicorn

from toolkit.api.app import create_app
from toolkit.api.connections import guarded_protocol
from toolkit.api.drain import DrainingServer
from toolkit.api.state import ServerState
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService
from toolkit.service.model_files import ModelFiles

# Builds the service once the socket is bound (in a worker thread); its argument is the function
# to call should serving become impossible later (a front end's lost engine link).
ServiceLoader = Callable[[Callable[[BaseException], None]], InferenceService]


def serve_http(
    args: ServerArgs,
    files: ModelFiles,
    load: ServiceLoader,
    sock: socket.socket,
    stop_now: Callable[[int], NoReturn],
) -> int:
    """Serve on the listening socket `sock` and return the exit code; `stop_now(code)` ends the
    process at once (a second Ctrl+C)."""
    state = ServerState(args=args, model_path=str(files.model_dir), tokenizer_path=str(files.tokenizer_dir))
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
        # uvicorn's own start and stop lines say nothing the server's own lines do not.
        log_level=args.log_level if args.log_level == "debug" else "warning",
        # toolkit.access logs each request once, with its inputs and tokens, and keeps probes
        # at debug level; uvicorn's access log would repeat every line, probes included.
        access_log=False,
        timeout_graceful_shutdown=args.drain_timeout,
        http=guarded_protocol(args.max_connections, args.header_timeout, args.body_timeout),
    )
    server = DrainingServer(config, state.admission, args.drain_timeout, stop_now)
    server.run(sockets=[sock])
    return exit_code
