"""`python -m toolkit.launch_server --model-path M [--host H] [--port P] --is-embedding`.

Parses the flags, sets the process up, takes the listening socket, reads the model's files, and
runs the single-process server or, with `--http-workers N`, the engine process and its front ends
(`toolkit.process`). A taken port, a missing model or a missing device is one clear line and
exit 1, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Sequence

from toolkit.environment import LISTEN_FD_ENV, PARENT_ENV
from toolkit.errors import ModelLoadError
from toolkit.execution.memory import pin_mmap_threshold, use_transparent_huge_pages
from toolkit.process.bootstrap import bind_error, configure_logging, listening_socket, stop_with_parent
from toolkit.server_args import ServerArgs

logger = logging.getLogger("toolkit")


def main(argv: Sequence[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)
    os.environ.pop(LISTEN_FD_ENV, None)  # the inherited socket is ours alone, not our children's
    parent = os.environ.pop(PARENT_ENV, None)
    configure_logging(args.log_level)
    pin_mmap_threshold()
    use_transparent_huge_pages()  # before torch is imported
    logger.info("%s", args.banner())
    logger.debug("server_args=%s", args.describe())
    if parent:
        stop_with_parent(parent)
    try:
        sock = listening_socket(args)
    except OSError as exc:
        logger.error("error: %s", bind_error(args, exc))
        return 1
    try:
        return _run(args, sock, list(sys.argv[1:] if argv is None else argv))
    except ModelLoadError as exc:
        logger.error("error: %s", exc)
        return 1
    finally:
        sock.close()


def _run(args: ServerArgs, sock: socket.socket, argv: list[str]) -> int:
    if args.model_path is not None and args.model_path.endswith(".gguf"):
        from toolkit.process.gguf import prepare_gguf  # converting imports transformers and torch

        prepare_gguf(args.model_path)
    files = args.model_files()
    # Imported here, not at the top: both import torch, which takes seconds, and --help or a
    # missing model should answer at once.
    if args.dp_size > 1:
        from toolkit.process import data_parallel

        front_ends = args.http_workers or args.dp_size
        return data_parallel.main(dataclasses.replace(args, http_workers=front_ends), files, argv, sock)
    if args.http_workers:
        from toolkit.process import engine

        return engine.main(args, files, argv, sock)
    from toolkit.process import single

    return single.main(args, files, sock)


if __name__ == "__main__":
    sys.exit(main())
