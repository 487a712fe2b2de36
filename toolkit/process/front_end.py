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
import sys
from collections.abc import Callable, Sequence

from toolkit.api.server import serve_http
from toolkit.environment import ENGINE_SOCKET_ENV, LISTEN_FD_ENV
from toolkit.process.bootstrap import configure_logging, exit_now, inherited_socket
from toolkit.scheduling.remote import RemoteBatcher, connect_to_engine
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService
from toolkit.service.validation import RequestLimits

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)
    engine_link = int(os.environ.pop(ENGINE_SOCKET_ENV))
    os.environ.pop(LISTEN_FD_ENV, None)
    configure_logging(args.log_level, f"front end {os.getpid()}")
    if args.listen_fd is None:
        logger.error("a front end needs the listening socket of its engine process")
        return 2
    files = args.model_files()

    def load(on_fatal: Callable[[BaseException], None]) -> InferenceService:
        link, served = connect_to_engine(engine_link)
        limits = RequestLimits(**served["limits"])
        queue = RemoteBatcher(link, on_fatal)
        return InferenceService(queue, files.tokenizer, files.spec, limits, int(served["embedding_dim"]))

    return serve_http(args, files, load, inherited_socket(args.listen_fd), exit_now)


if __name__ == "__main__":
    sys.exit(main())
