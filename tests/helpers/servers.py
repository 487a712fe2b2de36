"""Servers for tests: in process (Starlette's TestClient, or uvicorn on a loopback port in a
thread), over the real model or over the fake batch queue."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.helpers.fake_queue import FakeBatchQueue
from tests.helpers.waiting import wait_until
from toolkit.api.app import create_app
from toolkit.api.state import ServerState
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService
from toolkit.service.model_files import ModelFiles

READY_S = 120.0


def model_files(args: ServerArgs) -> ModelFiles:
    return args.model_files()


def real_service(args: ServerArgs, files: ModelFiles) -> InferenceService:
    from toolkit.execution.assembly import load_service  # torch: only for the real model

    return load_service(args, files)


def fake_service(args: ServerArgs, files: ModelFiles, hold: bool = False) -> InferenceService:
    """The model's tokenizer, spec and sizes over a `FakeBatchQueue` (that never answers, with
    `hold`): no torch, no weights."""
    config = json.loads((files.spec.transformer_dir / "config.json").read_text())
    context_length = args.context_length or files.spec.max_seq_length or config["max_position_embeddings"]
    limits = args.request_limits(files.spec, context_length, config["vocab_size"])
    dim = config["hidden_size"] * len(files.spec.pooling_modes)
    return InferenceService(FakeBatchQueue(dim, hold), files.tokenizer, files.spec, limits, dim)


Loader = Callable[[ServerArgs, ModelFiles], InferenceService]


def build_app(argv: list[str], loader: Loader = real_service) -> tuple[ServerState, Any]:
    """`(state, app)` for the given CLI arguments; the service loads once the app starts."""
    args = ServerArgs.from_cli(argv, environ={})
    files = model_files(args)
    state = ServerState(args, str(files.model_dir), str(files.tokenizer_dir))
    return state, create_app(state, lambda: loader(args, files))


def start_test_client(argv: list[str], loader: Loader = real_service) -> Any:
    """An in-process server (Starlette TestClient) for the given CLI arguments, once /health is 200."""
    from fastapi.testclient import TestClient

    state, app = build_app(argv, loader)
    client = TestClient(app, base_url="http://localhost")
    client.__enter__()
    wait_until(lambda: client.get("/health").status_code == 200, "the in-process server is ready", READY_S)
    client.state = state
    return client


@dataclass
class ThreadedServer:
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    url: str
    state: Any
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_threaded_server(argv: list[str], loader: Loader = real_service) -> ThreadedServer:
    """Real HTTP (disconnects, chunked bodies) while tests still reach the runner's fault_hook."""
    import requests
    import uvicorn

    state, app = build_app(argv, loader)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def healthy() -> bool:
        try:
            return requests.get(f"{url}/health", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(healthy, "the threaded server is ready", READY_S)
    return ThreadedServer(url, state, server, thread)
