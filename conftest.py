"""Shared pytest fixtures: the bundled model, and an in-process server around it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests never reach a model hub; everything they load is on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from toolkit.model_source import bundled_model_dir

    return bundled_model_dir()


def start_test_client(argv: list[str]):  # type: ignore[no-untyped-def]
    """An in-process server (Starlette TestClient) for the given CLI arguments, once /health is 200."""
    from fastapi.testclient import TestClient

    from toolkit.server.app import ServerState, create_app
    from toolkit.server_args import ServerArgs
    from toolkit.startup import load_engine, prepare

    args = ServerArgs.from_cli(argv, environ={})
    prepared = prepare(args)
    state = ServerState(args, str(prepared.model_dir), str(prepared.tokenizer_dir))
    client = TestClient(create_app(state, lambda: load_engine(args, prepared)))
    client.__enter__()
    deadline = time.monotonic() + 120
    while client.get("/health").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("in-process server did not become ready")
        time.sleep(0.02)
    client.state = state  # type: ignore[attr-defined]
    return client


@pytest.fixture(scope="session")
def minilm_client() -> Iterator:  # type: ignore[type-arg]
    client = start_test_client([])
    yield client
    client.__exit__(None, None, None)
