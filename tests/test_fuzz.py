"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis, Hypothesis).

Schemathesis generates valid and invalid requests for every operation in /openapi.json and sends
them over real loopback HTTP to a server in this process. Whatever it sends, the answer is never a
5xx, and every error body has OpenAI's shape. Examples per operation are bounded so the whole file
runs in about a minute on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from tests.helpers.servers import ThreadedServer, start_threaded_server

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 400


@pytest.fixture(scope="module")
def fuzzed_server() -> Iterator[ThreadedServer]:
    server = start_threaded_server(["--max-request-bytes", "65536"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: ThreadedServer) -> Any:
    raw = requests.get(f"{fuzzed_server.url}/openapi.json", timeout=30).json()
    return schemathesis.openapi.from_dict(raw)


# schemathesis' own pytest integration (`from_fixture`) does not run on pytest 9, so each
# operation's Hypothesis strategy is driven here with @given.
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("GET", "/get_model_info"),
    ("POST", "/v1/embeddings"),
    ("POST", "/encode"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/rerank"),
    ("POST", "/rerank"),
    ("POST", "/v2/rerank"),
    ("POST", "/v1/score"),
    ("POST", "/score"),
    ("POST", "/v2/embed"),
    ("POST", "/embed_sparse"),
]
# The same handlers under other paths: fuzzed with valid requests only.
ALIASES = {"/rerank", "/v2/rerank", "/score"}


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    listed = {
        (method.upper(), path)
        for path, methods in api_schema.raw_schema["paths"].items()
        for method in methods
    }
    assert listed == set(OPERATIONS)


# Negative cases (requests that break the schema) exist only where there is a body to break.
CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    ("POST", path, GenerationMode.NEGATIVE)
    for method, path in OPERATIONS
    if method == "POST" and path not in ALIASES
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=lambda value: str(value))
def test_no_request_gets_a_server_error(
    api_schema: Any, fuzzed_server: ThreadedServer, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,  # the same examples every run: a CI failure reproduces locally
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(base_url=fuzzed_server.url, timeout=30)
        assert response.status_code < 500, (
            f"{case.method} {case.path}: {response.status_code} {response.text}"
        )
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
