"""`python -m toolkit.launch_server --model-path M [--host H] [--port P] --is-embedding`."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence

from toolkit.errors import ModelLoadError
from toolkit.server_args import LISTEN_FD_ENV, ServerArgs

logger = logging.getLogger("toolkit")

LOG_FORMAT = "[%(asctime)s] %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stdout
    )
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True


def main(argv: Sequence[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)
    # The inherited socket is ours alone: processes we start must not see it.
    os.environ.pop(LISTEN_FD_ENV, None)
    configure_logging(args.log_level)
    logger.info("server_args=%s", args.describe())

    from toolkit.startup import load_engine, prepare

    try:
        prepared = prepare(args)
    except ModelLoadError as exc:
        logger.error("error: %s", exc)
        return 1

    import uvicorn

    from toolkit.server.app import ServerState, create_app

    state = ServerState(
        args=args, model_path=str(prepared.model_dir), tokenizer_path=str(prepared.tokenizer_dir)
    )
    exit_code = 0

    def on_fatal(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app = create_app(state, lambda: load_engine(args, prepared), on_fatal)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, log_level=args.log_level)
    server = uvicorn.Server(config)
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
