"""Shared pytest fixtures: the bundled model, and an in-process server around it."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Tests never reach a model hub; everything they load is on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from toolkit.service.model_source import bundled_model_dir

    return bundled_model_dir()


def build_app(argv: list[str]):  # type: ignore[no-untyped-def]
    """`(state, app)` for the given CLI arguments; the model loads once the app starts."""
    from toolkit.api.app import create_app
    from toolkit.api.state import ServerState
    from toolkit.execution.assembly import load_service
    from toolkit.server_args import ServerArgs
    from toolkit.service.model_files import read_model_files

    args = ServerArgs.from_cli(argv, environ={})
    files = read_model_files(args.model_path, args.tokenizer_path, args.pooling, args.normalize)
    state = ServerState(args, str(files.model_dir), str(files.tokenizer_dir))
    return state, create_app(state, lambda: load_service(args, files))


def start_test_client(argv: list[str]):  # type: ignore[no-untyped-def]
    """An in-process server (Starlette TestClient) for the given CLI arguments, once /health is 200."""
    from fastapi.testclient import TestClient

    state, app = build_app(argv)
    client = TestClient(app)
    client.__enter__()
    _wait_ready(lambda: client.get("/health").status_code)
    client.state = state  # type: ignore[attr-defined]
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


def start_threaded_server(argv: list[str]) -> ThreadedServer:
    """Real HTTP (disconnects, chunked bodies) while tests still reach the runner's fault_hook."""
    import requests
    import uvicorn

    state, app = build_app(argv)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def health() -> int:
        try:
            return requests.get(f"{url}/health", timeout=5).status_code
        except requests.ConnectionError:
            return 0

    _wait_ready(health)
    return ThreadedServer(url, state, server, thread)


def _wait_ready(status: Callable[[], int]) -> None:
    deadline = time.monotonic() + 120
    while status() != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("in-process server did not become ready")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def minilm_client() -> Iterator:  # type: ignore[type-arg]
    client = start_test_client([])
    yield client
    client.__exit__(None, None, None)


@pytest.fixture
def fresh_client(request: pytest.FixtureRequest) -> Iterator:  # type: ignore[type-arg]
    """A server of its own (a test may break it); parametrize it indirectly with CLI arguments."""
    client = start_test_client(list(getattr(request, "param", [])))
    yield client
    client.state.service.queue.runner.fault_hook = None
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[ThreadedServer]:
    """A real-HTTP server with a 4 KiB body limit, shared by the tests of one module."""
    server = start_threaded_server(["--max-request-bytes", "4096"])
    yield server
    server.stop()
