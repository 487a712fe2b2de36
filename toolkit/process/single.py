"""The single-process server: HTTP, the batcher and the model in one process (the default)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from toolkit.api.server import serve_http
from toolkit.execution.assembly import load_service
from toolkit.execution.device import pick_device
from toolkit.execution.memory import prepare_process_memory
from toolkit.process.bootstrap import exit_now, settle_garbage_collector
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService
from toolkit.service.model_files import ModelFiles


def main(args: ServerArgs, files: ModelFiles, sock: socket.socket) -> int:
    """Serve on `sock` until SIGTERM or a fatal error; the model loads in a thread meanwhile."""
    prepare_process_memory(pick_device(args.device).type)  # before serve_http starts the loading thread
    loaded = threading.Event()

    def load(_: Callable[[BaseException], None]) -> InferenceService:
        service = load_service(args, files)
        settle_garbage_collector()
        loaded.set()
        return service

    exit_code = serve_http(args, files, load, sock, exit_now)
    if not loaded.is_set():  # stopped (or failed) before the model was ready
        exit_now(exit_code)
    return exit_code
