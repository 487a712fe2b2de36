"""Hardening of the HTTP surface: a catalogue of bad requests, odd but valid ones, body limits over
real HTTP, access control, CORS, and what the server reports about itself (metrics, timing
headers, access log). Faults, overload and shutdown are in test_faults.py.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.helpers.api_calls import assert_openai_error
from tests.helpers.faults import (
    CLS,
    ids,
    parse_metrics,
    port_of,
    read_response,
    sample,
    scrape,
)
from tests.helpers.servers import ThreadedServer, fake_service, start_test_client, start_threaded_server
from tests.helpers.waiting import WAIT_S, wait_until

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Small limits, so that every limit can be hit with small requests.
STRICT = [
    "--api-key",
    KEY,
    "--max-request-bytes",
    "4096",
    "--max-inputs-per-request",
    "8",
    "--max-tokens-per-request",
    "64",
]

REQUEST_START = b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\n"


@pytest.fixture(scope="module")
def strict_client() -> Iterator[Any]:
    client = start_test_client(STRICT, loader=fake_service)
    yield client
    client.__exit__(None, None, None)


# --- a catalogue of bad requests --------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    status: int
    path: str = "/v1/embeddings"
    method: str = "POST"
    json: Any = None
    content: bytes | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    param: str | None = None
    code: str | None = None
    auth: bool = True


def _chunks(size: int, count: int) -> Iterator[bytes]:
    yield b'{"input": "'
    for _ in range(count):
        yield b"x" * size
    yield b'"}'


CATALOGUE: dict[str, Bad] = {
    # The body is not a JSON object.
    "invalid-json": Bad(400, content=b"{bad json"),
    "empty-body": Bad(400, content=b""),
    "truncated-json": Bad(400, content=b'{"input": "hi"'),
    "json-array": Bad(400, content=b"[1, 2]"),
    "json-string": Bad(400, content=b'"text"'),
    "json-null": Bad(400, content=b"null"),
    "json-number": Bad(400, content=b"42"),
    "nan-literal": Bad(400, content=b'{"input": NaN}'),
    "infinite-number": Bad(400, content=b'{"input": [1e400]}'),
    "invalid-utf8": Bad(400, content=b'{"input": "\xff\xfe"}'),
    "utf8-bom": Bad(400, content=b'\xef\xbb\xbf{"input": "hi"}'),
    "lone-surrogate": Bad(400, content=b'{"input": "\\ud800"}'),
    "lone-surrogate-in-list": Bad(400, content=b'{"input": ["ok", "a\\udfffb"]}'),
    "nested-too-deep": Bad(400, content=b"[" * 2000 + b"]" * 2000),
    "form-encoded": Bad(
        400, content=b"input=hello", headers={"content-type": "application/x-www-form-urlencoded"}
    ),
    "multipart": Bad(
        400,
        content=b'--b\r\nContent-Disposition: form-data; name="input"\r\n\r\nhi\r\n--b--\r\n',
        headers={"content-type": "multipart/form-data; boundary=b"},
    ),
    # `input` of the wrong type or content.
    "input-missing": Bad(400, json={}, param="input"),
    "input-null": Bad(400, json={"input": None}, param="input"),
    "input-bool": Bad(400, json={"input": True}, param="input"),
    "input-number": Bad(400, json={"input": 7}, param="input"),
    "input-object": Bad(400, json={"input": {"text": "hi"}}, param="input"),
    "input-empty-string": Bad(400, json={"input": ""}, param="input"),
    "input-empty-list": Bad(400, json={"input": []}, param="input"),
    "input-empty-item": Bad(400, json={"input": ["ok", ""]}, param="input"),
    "input-empty-ids": Bad(400, json={"input": [[]]}, param="input"),
    "input-mixed-types": Bad(400, json={"input": ["a", 1]}, param="input"),
    "input-float-id": Bad(400, json={"input": [1.5]}, param="input"),
    "input-bool-id": Bad(400, json={"input": [True, 5]}, param="input"),
    "input-negative-id": Bad(400, json={"input": [CLS, -1]}, param="input"),
    "input-id-past-vocab": Bad(400, json={"input": [CLS, 30522]}, param="input"),
    "input-id-past-int64": Bad(400, content=b'{"input": [18446744073709551616]}'),
    "input-ids-too-deep": Bad(400, json={"input": [[[CLS]]]}, param="input"),
    # Limits.
    "too-many-inputs": Bad(400, json={"input": ["x"] * 9}, param="input"),
    "too-many-tokens": Bad(
        400, json={"input": [ids(7) * 5] * 5}, param="input", code="max_tokens_per_request_exceeded"
    ),
    "over-context": Bad(400, json={"input": "word " * 300}, param="input", code="context_length_exceeded"),
    "ids-over-context": Bad(400, json={"input": [[7] * 257]}, param="input", code="context_length_exceeded"),
    "body-over-limit": Bad(413, json={"input": "x" * 5000}, code="payload_too_large"),
    "chunked-body-over-limit": Bad(413, content=_chunks(1024, 8), code="payload_too_large"),  # type: ignore[arg-type]
    # The other fields.
    "model-unknown": Bad(404, json={"input": "hi", "model": "no-such-model"}, param="model"),
    "model-not-string": Bad(400, json={"input": "hi", "model": 3}, param="model"),
    "encoding-format-unknown": Bad(
        400, json={"input": "hi", "encoding_format": "int8"}, param="encoding_format"
    ),
    "encoding-format-null": Bad(400, json={"input": "hi", "encoding_format": None}, param="encoding_format"),
    "dimensions-zero": Bad(400, json={"input": "hi", "dimensions": 0}, param="dimensions"),
    "dimensions-negative": Bad(400, json={"input": "hi", "dimensions": -1}, param="dimensions"),
    "dimensions-too-large": Bad(400, json={"input": "hi", "dimensions": 385}, param="dimensions"),
    "dimensions-string": Bad(400, json={"input": "hi", "dimensions": "8"}, param="dimensions"),
    "dimensions-float": Bad(400, json={"input": "hi", "dimensions": 1.5}, param="dimensions"),
    "dimensions-bool": Bad(400, json={"input": "hi", "dimensions": True}, param="dimensions"),
    "user-not-string": Bad(400, json={"input": "hi", "user": 123}, param="user"),
    "prompt-name-unknown": Bad(400, json={"input": "hi", "prompt_name": "query"}, param="prompt_name"),
    "prompt-and-prompt-name": Bad(400, json={"input": "hi", "prompt": "q: ", "prompt_name": "q"}),
    "prompt-with-token-ids": Bad(400, json={"input": ids(7), "prompt": "query: "}, param="prompt"),
    "truncate-not-bool": Bad(400, json={"input": "hi", "truncate": "yes"}, param="truncate"),
    "truncation-side-unknown": Bad(
        400, json={"input": "hi", "truncation_side": "middle"}, param="truncation_side"
    ),
    # The native route.
    "encode-empty": Bad(400, path="/encode", json={}, param="text"),
    "encode-both": Bad(400, path="/encode", json={"text": "a", "input_ids": ids(7)}, param="text"),
    "encode-text-number": Bad(400, path="/encode", json={"text": 5}, param="text"),
    "encode-ids-strings": Bad(400, path="/encode", json={"input_ids": ["a"]}, param="input_ids"),
    "encode-ids-past-vocab": Bad(400, path="/encode", json={"input_ids": [10**6]}, param="input_ids"),
    # Rerank and score (by cosine on an embedding model), Cohere's /v2/embed, the tokenizer.
    "rerank-documents-missing": Bad(400, path="/v1/rerank", json={"query": "q"}, param="documents"),
    "rerank-documents-empty": Bad(
        400, path="/v1/rerank", json={"query": "q", "documents": []}, param="documents"
    ),
    "rerank-too-many-documents": Bad(
        400, path="/rerank", json={"query": "q", "documents": ["x"] * 9}, param="documents"
    ),
    "rerank-10k-documents": Bad(
        413, path="/rerank", json={"query": "q", "documents": ["x"] * 10_000}, code="payload_too_large"
    ),
    "rerank-document-number": Bad(
        400, path="/v1/rerank", json={"query": "q", "documents": [1]}, param="documents"
    ),
    "rerank-document-null": Bad(
        400, path="/v1/rerank", json={"query": "q", "documents": ["ok", None]}, param="documents"
    ),
    "rerank-document-object-without-text": Bad(
        400, path="/v1/rerank", json={"query": "q", "documents": [{"title": "x"}]}, param="documents"
    ),
    "rerank-document-empty": Bad(
        400, path="/v2/rerank", json={"query": "q", "documents": ["ok", ""]}, param="documents"
    ),
    "rerank-query-missing": Bad(400, path="/v1/rerank", json={"documents": ["a"]}, param="query"),
    "rerank-query-empty": Bad(400, path="/v1/rerank", json={"query": "", "documents": ["a"]}, param="query"),
    "rerank-query-list": Bad(
        400, path="/v1/rerank", json={"query": ["q"], "documents": ["a"]}, param="query"
    ),
    "rerank-top-n-zero": Bad(
        400, path="/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": 0}, param="top_n"
    ),
    "rerank-top-n-negative": Bad(
        400, path="/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": -1}, param="top_n"
    ),
    "rerank-top-n-huge": Bad(
        400, path="/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": 2**40}, param="top_n"
    ),
    "rerank-top-n-string": Bad(
        400, path="/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": "3"}, param="top_n"
    ),
    "rerank-document-over-context": Bad(
        400,
        path="/v1/rerank",
        json={"query": "q", "documents": ["word " * 300]},
        param="documents",
        code="context_length_exceeded",
    ),
    "rerank-truncated-over-token-budget": Bad(
        400,
        path="/v1/rerank",
        json={"query": "q", "documents": ["word " * 300], "truncate": True},
        param="documents",
        code="max_tokens_per_request_exceeded",
    ),
    "rerank-return-documents-string": Bad(
        400, path="/v1/rerank", json={"query": "q", "documents": ["a"], "return_documents": "no"}
    ),
    "rerank-model-unknown": Bad(
        404, path="/v1/rerank", json={"query": "q", "documents": ["a"], "model": "m"}
    ),
    "score-text-2-missing": Bad(400, path="/v1/score", json={"text_1": "a"}, param="text_2"),
    "score-text-2-empty": Bad(400, path="/score", json={"text_1": "a", "text_2": []}, param="text_2"),
    "score-lengths-differ": Bad(
        400, path="/v1/score", json={"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, param="text_1"
    ),
    "score-text-1-number": Bad(400, path="/v1/score", json={"text_1": 1, "text_2": ["a"]}, param="text_1"),
    "v2-embed-texts-missing": Bad(400, path="/v2/embed", json={"input_type": "search_query"}, param="texts"),
    "v2-embed-type-unknown": Bad(
        400, path="/v2/embed", json={"texts": ["a"], "embedding_types": ["int4"]}, param="embedding_types"
    ),
    "v2-embed-types-empty": Bad(
        400, path="/v2/embed", json={"texts": ["a"], "embedding_types": []}, param="embedding_types"
    ),
    "v2-embed-types-too-many": Bad(
        400, path="/v2/embed", json={"texts": ["a"], "embedding_types": ["int8"] * 7}, param="embedding_types"
    ),
    "v2-embed-types-not-a-list": Bad(
        400, path="/v2/embed", json={"texts": ["a"], "embedding_types": "int8"}, param="embedding_types"
    ),
    "v2-embed-input-type-unknown": Bad(
        400, path="/v2/embed", json={"texts": ["a"], "input_type": "search"}, param="input_type"
    ),
    "v2-embed-truncate-unknown": Bad(
        400, path="/v2/embed", json={"texts": ["a"], "truncate": "MIDDLE"}, param="truncate"
    ),
    "v2-embed-images": Bad(
        400, path="/v2/embed", json={"texts": ["a"], "images": ["data:,"]}, param="images"
    ),
    "v2-embed-output-dimension-too-large": Bad(
        400, path="/v2/embed", json={"texts": ["a"], "output_dimension": 385}, param="output_dimension"
    ),
    "v2-embed-no-truncation-over-context": Bad(
        400,
        path="/v2/embed",
        json={"texts": ["word " * 300], "truncate": "NONE"},
        param="texts",
        code="context_length_exceeded",
    ),
    "embeddings-embedding-type-unknown": Bad(
        400, json={"input": "hi", "embedding_type": "int4"}, param="embedding_type"
    ),
    "tokenize-prompt-missing": Bad(400, path="/tokenize", json={}, param="prompt"),
    "tokenize-prompt-number": Bad(400, path="/tokenize", json={"prompt": 5}, param="prompt"),
    "tokenize-too-many": Bad(400, path="/tokenize", json={"prompt": ["x"] * 9}, param="prompt"),
    "detokenize-past-vocab": Bad(400, path="/detokenize", json={"tokens": [30522]}, param="tokens"),
    "detokenize-strings": Bad(400, path="/detokenize", json={"tokens": ["a"]}, param="tokens"),
    "detokenize-nested": Bad(400, path="/detokenize", json={"tokens": [[101]]}, param="tokens"),
    # HTTP: routes, methods, access.
    "get-embeddings": Bad(405, method="GET"),
    "put-encode": Bad(405, path="/encode", method="PUT", json={}),
    "unknown-route": Bad(404, path="/v2/embeddings", json={"input": "hi"}),
    "no-api-key": Bad(401, json={"input": "hi"}, auth=False, code="invalid_api_key"),
    "wrong-api-key": Bad(401, json={"input": "hi"}, headers={"Authorization": "Bearer sesam"}),
    "key-without-scheme": Bad(401, json={"input": "hi"}, headers={"Authorization": KEY}),
    "basic-auth": Bad(401, json={"input": "hi"}, headers={"Authorization": "Basic c2VzYW1lOg=="}),
    "non-ascii-key": Bad(401, json={"input": "hi"}, headers={"Authorization": b"Bearer s\xe9same"}),
    "models-without-key": Bad(401, path="/v1/models", method="GET", auth=False),
    "metrics-without-key": Bad(401, path="/metrics", method="GET", auth=False),
    "openapi-without-key": Bad(401, path="/openapi.json", method="GET", auth=False),
    "docs-are-off": Bad(404, path="/docs", method="GET"),
}


def send(client: Any, case: Bad) -> Any:
    headers = {**(AUTH if case.auth else {}), **case.headers}
    body: dict[str, Any] = {"json": case.json} if case.content is None else {"content": case.content}
    if case.content is None and case.json is None:
        body = {}
    return client.request(case.method, case.path, headers=headers, **body)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_request_gets_a_4xx_in_openai_shape_and_the_server_keeps_serving(
    strict_client, name: str
) -> None:
    case = CATALOGUE[name]
    error = assert_openai_error(send(strict_client, case), case.status, case.param)
    if case.code is not None:
        assert error["code"] == case.code
    assert error["type"] in {"invalid_request_error", "server_error", "rate_limit_error"}
    good = strict_client.post("/v1/embeddings", json={"input": "still serving"}, headers=AUTH)
    assert good.status_code == 200, good.text


def test_catalogue_is_large() -> None:
    assert len(CATALOGUE) >= 80


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({"input": "a\u0000b"}, {}),  # NUL inside a text
        ({"input": ["\u0000"]}, {}),
        ({"input": "emoji 🦙 and 中文 and עברית"}, {}),
        ({"input": "zero\u200bwidth\ufeffspace"}, {}),
        ({"input": "hi", "unknown_field": [1, 2]}, {}),  # OpenAI clients add fields over time
        ({"input": "hi"}, {"content-type": "text/plain"}),  # curl -d without -H
        ({"input": "hi"}, {"content-type": "application/json; charset=utf-8"}),
        ({"input": "hi"}, {"Authorization": f"bearer {KEY}"}),  # the scheme is case-insensitive
    ],
)
def test_odd_but_valid_requests_are_answered(
    strict_client, body: dict[str, Any], headers: dict[str, str]
) -> None:
    response = strict_client.post("/v1/embeddings", content=json.dumps(body), headers={**AUTH, **headers})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384


def test_chunked_body_over_limit_is_413_json_over_real_http(threaded_server: ThreadedServer) -> None:
    port = port_of(threaded_server.url)
    chunk = b"x" * 1024
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in [b'{"input": "', *[chunk] * 8, b'"}'])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
        )
        status, headers, payload = read_response(sock)
    assert status == 413
    assert headers["connection"] == "close"
    assert json.loads(payload)["error"]["code"] == "payload_too_large"
    assert requests.post(f"{threaded_server.url}/v1/embeddings", json={"input": "hi"}).status_code == 200


def test_client_leaving_mid_body_is_not_a_server_error(threaded_server: ThreadedServer, caplog) -> None:
    port = port_of(threaded_server.url)
    before = sample(
        scrape(threaded_server.url), "toolkit_requests_total", route="/v1/embeddings", status="499"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(REQUEST_START + b'Content-Length: 1000\r\n\r\n{"input"')
    wait_until(
        lambda: (
            sample(
                scrape(threaded_server.url), "toolkit_requests_total", route="/v1/embeddings", status="499"
            )
            == before + 1
        ),
        "the server noticed the client left",
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- access, headers, metrics, logs ---------------------------------------------------------------


def test_metrics_count_requests_batches_stages_and_queue(strict_client) -> None:
    before = parse_metrics(strict_client.get("/metrics", headers=AUTH).text)
    for text in ["one", "two words", "three words here"]:
        assert (
            strict_client.post("/v1/embeddings", json={"input": [text, text]}, headers=AUTH).status_code
            == 200
        )
    assert strict_client.post("/v1/embeddings", json={"input": ""}, headers=AUTH).status_code == 400
    assert strict_client.get("/nowhere", headers=AUTH).status_code == 404
    response = strict_client.get("/metrics", headers=AUTH)
    assert response.headers["content-type"].startswith("text/plain")
    after = parse_metrics(response.text)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("toolkit_requests_total", route="/v1/embeddings", status="200") == 3
    assert grew("toolkit_requests_total", route="/v1/embeddings", status="400") == 1
    assert grew("toolkit_requests_total", route="other", status="404") == 1
    assert grew("toolkit_request_duration_seconds_count", route="/v1/embeddings") == 4
    for stage in ("toolkit_tokenization_seconds", "toolkit_queue_wait_seconds", "toolkit_inference_seconds"):
        assert grew(f"{stage}_count") == 3, stage
    assert grew("toolkit_embedded_inputs_total") == 6
    assert grew("toolkit_prompt_tokens_total") == 2 * (3 + 4 + 5)
    assert grew("toolkit_batch_inputs_count") >= 3 and grew("toolkit_batch_tokens_sum") == 24
    assert grew("toolkit_batch_seconds_count") >= 3
    assert sample(after, "toolkit_queue_inputs") == sample(after, "toolkit_queue_tokens") == 0
    assert sample(after, "toolkit_ready") == 1 and sample(after, "toolkit_requests_in_flight") == 0


def test_request_id_and_server_timing_headers(strict_client) -> None:
    response = strict_client.post(
        "/v1/embeddings", json={"input": "hi"}, headers={**AUTH, "X-Request-Id": "my-trace.42"}
    )
    assert response.headers["x-request-id"] == "my-trace.42"
    stages = [part.split(";")[0] for part in response.headers["server-timing"].split(", ")]
    assert stages == ["tokenize", "queue", "inference", "total"]
    generated = strict_client.get("/v1/models", headers={**AUTH, "X-Request-Id": "bad id\x7f" * 2})
    assert len(generated.headers["x-request-id"]) == 32
    assert generated.headers["server-timing"].startswith("total;dur=")
    assert strict_client.get("/v2/x").headers["x-request-id"]  # errors carry one too


def test_access_log_is_one_line_per_request_without_bodies_and_probes_are_quiet(
    strict_client, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="toolkit.access")
    strict_client.post("/v1/embeddings", json={"input": ["zebra secret", "x"]}, headers=AUTH)
    strict_client.get("/health")
    strict_client.get("/metrics", headers=AUTH)
    lines = [r for r in caplog.records if r.name == "toolkit.access"]
    assert [(r.levelno, r.getMessage().split()[1]) for r in lines] == [
        (logging.INFO, "path=/v1/embeddings"),
        (logging.DEBUG, "path=/health"),
        (logging.DEBUG, "path=/metrics"),
    ]
    message = lines[0].getMessage()
    assert "method=POST" in message and "status=200" in message and "inputs=2 tokens=" in message
    assert "duration_ms=" in message and "request_id=" in message
    assert "zebra" not in caplog.text


@pytest.fixture(scope="module")
def cors_client() -> Iterator[Any]:
    client = start_test_client(["--cors-allow-origins", "http://notebook.example"], loader=fake_service)
    yield client
    client.__exit__(None, None, None)


def test_cors_only_for_allowed_origins(cors_client, strict_client) -> None:
    preflight = {"Origin": "http://notebook.example", "Access-Control-Request-Method": "POST"}
    allowed = cors_client.options("/v1/embeddings", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://notebook.example"
    answer = cors_client.post(
        "/v1/embeddings", json={"input": "hi"}, headers={"Origin": "http://notebook.example"}
    )
    assert answer.headers["access-control-allow-origin"] == "http://notebook.example"
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    other = cors_client.options("/v1/embeddings", headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    off = strict_client.options("/v1/embeddings", headers=preflight)
    assert off.status_code == 405 and "access-control-allow-origin" not in off.headers


def test_health_needs_no_key_but_everything_else_does(strict_client) -> None:
    assert strict_client.get("/health").status_code == 200
    assert strict_client.get("/openapi.json", headers=AUTH).json()["paths"]["/v1/embeddings"]
    assert strict_client.get("/metrics", headers=AUTH).status_code == 200
    assert strict_client.get("/get_model_info").status_code == 401


def test_a_non_ascii_key_is_compared_as_utf_8() -> None:
    """Over real HTTP (the test client re-encodes header bytes): the key's UTF-8 bytes pass,
    its Latin-1 bytes do not."""
    server = start_threaded_server(["--api-key", "sésame"], loader=fake_service)
    body = json.dumps({"input": "hi"}).encode()
    statuses = []
    try:
        for key in ("sésame".encode(), "sésame".encode("latin-1")):
            with socket.create_connection(("127.0.0.1", port_of(server.url)), timeout=WAIT_S) as sock:
                sock.sendall(
                    b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (key, len(body), body)
                )
                statuses.append(read_response(sock)[0])
    finally:
        server.stop()
    assert statuses == [200, 401]


@pytest.mark.parametrize(
    ("host", "status"),
    [("localhost:30000", 200), ("127.0.0.1", 200), ("[::1]:8000", 200), ("rebound.example", 403)],
)
def test_a_loopback_server_answers_only_to_loopback_names(strict_client, host: str, status: int) -> None:
    """DNS rebinding: a page whose name points at 127.0.0.1 still names its own host."""
    response = strict_client.post("/v1/embeddings", json={"input": "hi"}, headers={**AUTH, "Host": host})
    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["error"]["code"] == "forbidden"


def test_extra_names_and_every_interface_widen_the_hosts() -> None:
    for flags in (["--allowed-hosts", "embed.internal"], ["--host", "0.0.0.0"]):
        client = start_test_client(flags, loader=fake_service)
        try:
            answer = client.post("/v1/embeddings", json={"input": "hi"}, headers={"Host": "embed.internal"})
        finally:
            client.__exit__(None, None, None)
        assert answer.status_code == 200, (flags, answer.text)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Content-Type": "text/plain"}, 200),  # curl -d: no Origin, not a browser page
        ({"Content-Type": "text/plain", "Origin": "http://evil.example"}, 403),  # a page's simple POST
        ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
    ],
)
def test_web_pages_cannot_post_without_cors(strict_client, headers: dict[str, str], status: int) -> None:
    body = json.dumps({"input": "hi"})
    response = strict_client.post("/v1/embeddings", content=body, headers={**AUTH, **headers})
    assert response.status_code == status, response.text


def test_an_allowed_origin_must_still_send_json(cors_client) -> None:
    origin = {"Origin": "http://notebook.example"}
    body = json.dumps({"input": "hi"})
    plain = cors_client.post("/v1/embeddings", content=body, headers={**origin, "Content-Type": "text/plain"})
    as_json = cors_client.post(
        "/v1/embeddings", content=body, headers={**origin, "Content-Type": "application/json"}
    )
    assert (plain.status_code, as_json.status_code) == (403, 200)
