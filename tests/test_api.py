"""The HTTP contract, in process: OpenAI's embeddings API and the native routes, with the bundled
model's tokenizer over a fake batch queue (no torch, no weights; the model's own vectors are the
fidelity tests' business)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.helpers.api_calls import assert_openai_error, embed, vectors
from tests.helpers.servers import fake_service, start_test_client
from toolkit.server_args import DEFAULT_MODEL_NAME

TEXTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog.", "embeddings!"]


def test_response_shape_and_usage_match_tokenizer(fake_client) -> None:
    response = embed(fake_client, input=TEXTS, model=DEFAULT_MODEL_NAME)
    body = response.json()
    assert response.status_code == 200
    assert body["object"] == "list" and body["model"] == DEFAULT_MODEL_NAME
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" and len(item["embedding"]) == 384 for item in body["data"])
    tokenizer = fake_client.state.service.tokenizer
    expected = sum(len(ids) for ids in tokenizer.encode(TEXTS))
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}


def test_four_input_forms_agree(fake_client) -> None:
    ids = fake_client.state.service.tokenizer.encode(TEXTS)
    as_strings = vectors(embed(fake_client, input=TEXTS))
    as_string = vectors(embed(fake_client, input=TEXTS[0]))
    as_ids = vectors(embed(fake_client, input=ids[0]))
    as_id_lists = vectors(embed(fake_client, input=ids))
    np.testing.assert_allclose(as_string[0], as_strings[0], atol=1e-6)
    np.testing.assert_allclose(as_ids[0], as_strings[0], atol=1e-6)
    np.testing.assert_allclose(as_id_lists, as_strings, atol=1e-6)


def test_base64_is_little_endian_float32_of_the_same_vector(fake_client) -> None:
    floats = vectors(embed(fake_client, input=TEXTS))
    response = embed(fake_client, input=TEXTS, encoding_format="base64")
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in response.json()["data"]]
    )
    np.testing.assert_array_equal(decoded, floats)


@pytest.mark.parametrize("dimensions", [1, 64, 383, 384])
def test_dimensions_truncate_then_renormalize(fake_client, dimensions: int) -> None:
    full = vectors(embed(fake_client, input=TEXTS))
    short = vectors(embed(fake_client, input=TEXTS, dimensions=dimensions))
    assert short.shape == (3, dimensions)
    expected = full[:, :dimensions] / np.linalg.norm(full[:, :dimensions], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)


def test_user_field_is_accepted(fake_client) -> None:
    assert embed(fake_client, input="hi", user="someone").status_code == 200


def test_truncation_on_request(fake_client) -> None:
    long_text = "word " * 400
    assert_openai_error(embed(fake_client, input=long_text), 400, "input")
    right = vectors(embed(fake_client, input=long_text, truncate=True))
    left = vectors(embed(fake_client, input=long_text + "end", truncate=True, truncation_side="left"))
    assert right.shape == left.shape == (1, 384)
    usage = embed(fake_client, input=long_text, truncate=True).json()["usage"]
    assert usage["prompt_tokens"] == 256


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["ok", ""]}, 400, "input"),
        ({"input": [[]]}, 400, "input"),
        ({"input": [101, 10**9]}, 400, "input"),
        ({"input": [101, -1]}, 400, "input"),
        ({"input": ["a", 1]}, 400, "input"),
        ({"input": [1.5]}, 400, "input"),
        ({"input": True}, 400, "input"),
        ({"input": None}, 400, "input"),
        ({}, 400, "input"),
        ({"input": "hi", "model": "no-such-model"}, 404, "model"),
        ({"input": "hi", "dimensions": 0}, 400, "dimensions"),
        ({"input": "hi", "dimensions": 385}, 400, "dimensions"),
        ({"input": "hi", "dimensions": "8"}, 400, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "hi", "prompt_name": "query"}, 400, "prompt_name"),
        ({"input": [101, 102], "prompt": "query: "}, 400, "prompt"),
        ({"input": "word " * 300}, 400, "input"),
        ({"input": ["x"] * 2049}, 400, "input"),
    ],
)
def test_bad_requests_get_openai_errors_and_server_keeps_serving(fake_client, body, status, param) -> None:
    assert_openai_error(fake_client.post("/v1/embeddings", json=body), status, param)
    assert embed(fake_client, input="still serving").status_code == 200


def test_not_found_code_and_over_length_code(fake_client) -> None:
    assert assert_openai_error(embed(fake_client, input="x", model="nope"), 404)["code"] == "model_not_found"
    over = assert_openai_error(embed(fake_client, input="word " * 300), 400)
    assert over["code"] == "context_length_exceeded"
    assert "256" in over["message"] and "302" in over["message"]


@pytest.mark.parametrize(
    "raw", [b"{bad json", b"[1, 2]", b'"text"', b"", b'{"input": "\\ud800"}', b"\xff\xfe"]
)
def test_malformed_bodies_are_400(fake_client, raw: bytes) -> None:
    response = fake_client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_body_without_json_content_type_is_still_parsed(fake_client) -> None:
    response = fake_client.post("/v1/embeddings", content=b'{"input": "hi"}')
    assert response.status_code == 200


def test_unknown_route_and_method(fake_client) -> None:
    assert_openai_error(fake_client.get("/v2/nothing"), 404)
    assert_openai_error(fake_client.get("/v1/embeddings"), 405)


def test_encode_route_single_and_list(fake_client) -> None:
    reference = vectors(embed(fake_client, input=TEXTS))
    single = fake_client.post("/encode", json={"text": TEXTS[0]}).json()
    assert set(single) == {"embedding", "meta_info"}
    np.testing.assert_allclose(single["embedding"], reference[0], atol=1e-6)
    many = fake_client.post("/encode", json={"text": TEXTS}).json()
    assert len(many) == 3
    ids = fake_client.state.service.tokenizer.encode(TEXTS)
    by_ids = fake_client.post("/encode", json={"input_ids": ids[1]}).json()
    np.testing.assert_allclose(by_ids["embedding"], reference[1], atol=1e-6)
    assert by_ids["meta_info"]["prompt_tokens"] == len(ids[1])
    assert_openai_error(fake_client.post("/encode", json={}), 400)


def test_model_listing_and_info(fake_client) -> None:
    models = fake_client.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == DEFAULT_MODEL_NAME and card["max_model_len"] == 256
    info = fake_client.get("/get_model_info").json()
    assert info["is_generation"] is False
    assert info["model_path"] == info["tokenizer_path"]
    assert info["embedding_dim"] == 384 and info["pooling"] == ["mean"]
    assert fake_client.get("/health").json() == {"status": "ok"}


def test_token_ids_another_tokenizer_made_are_embedded_with_a_warning(caplog) -> None:
    """Ids without the model's own [CLS] ... [SEP] framing (tiktoken's, as LangChain sends them by
    default) are embedded as asked, but the log says what probably happened, once a minute."""
    import logging

    client = start_test_client([], loader=fake_service)  # a server that has warned of nothing yet
    framed = client.state.service.tokenizer.encode(TEXTS[:1])
    with caplog.at_level(logging.WARNING, logger="toolkit.service.inference"):
        assert embed(client, input=framed).status_code == 200
        assert not caplog.records
        for _ in range(3):
            assert embed(client, input=[[9906, 1917]]).status_code == 200
    client.__exit__(None, None, None)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "check_embedding_ctx_length=False" in warnings[0]
    assert "first [101], last [102]" in warnings[0]


def test_long_values_are_echoed_cut(fake_client) -> None:
    model = assert_openai_error(embed(fake_client, input="x", model="m" * 100_000), 404)
    path = assert_openai_error(fake_client.get("/" + "p" * 10_000), 404)
    assert len(model["message"]) < 400 and "(100002 characters)" in model["message"]
    assert len(path["message"]) < 400 and "(10001 characters)" in path["message"]


def test_a_request_past_its_timeout_gets_504_and_its_work_is_withdrawn() -> None:
    from functools import partial

    client = start_test_client(["--request-timeout", "0.2"], loader=partial(fake_service, hold=True))
    try:
        error = assert_openai_error(embed(client, input="never answered"), 504)
        queue = client.state.service.queue
    finally:
        client.__exit__(None, None, None)
    assert error["code"] == "request_timeout" and "0.2 s" in error["message"]
    assert [future.cancelled() for future in queue.futures] == [True]
