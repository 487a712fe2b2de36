"""Shared pytest fixtures: the bundled model, servers around it (real or over a fake batch queue),
and the markers that pick the fast loop (`pytest -m "not slow"`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Tests never reach a model hub; everything they load is on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests of these kinds are slow as well: they start processes, run notebooks or build the site.
_SLOW_KINDS = ("subprocess", "notebook", "docs", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(kind) for kind in _SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from toolkit.service.model_source import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def minilm_client() -> Iterator[Any]:
    """The bundled model behind an in-process server, shared by the whole session."""
    from tests.helpers.servers import start_test_client

    client = start_test_client([])
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def fake_client() -> Iterator[Any]:
    """The bundled model's tokenizer over a fake batch queue: the HTTP contract without torch."""
    from tests.helpers.servers import fake_service, start_test_client

    client = start_test_client([], loader=fake_service)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture
def fresh_client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A server of its own (a test may break it); parametrize it indirectly with CLI arguments."""
    from tests.helpers.servers import start_test_client

    client = start_test_client(list(getattr(request, "param", [])))
    yield client
    client.state.service.queue.runner.fault_hook = None
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[Any]:
    """A real-HTTP server with a 4 KiB body limit, shared by the tests of one module."""
    from tests.helpers.servers import start_threaded_server

    server = start_threaded_server(["--max-request-bytes", "4096"])
    yield server
    server.stop()
