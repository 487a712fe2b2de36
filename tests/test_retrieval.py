"""The retrieval routes on the bundled embedding model, over real HTTP, driven as users drive them
(plain `requests` and the `cohere` SDK) and checked against sentence-transformers: rerank and
score by cosine similarity, Cohere's /v2/embed with compact types, /tokenize and /detokenize."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import requests

from tests.helpers.servers import ThreadedServer, start_threaded_server
from toolkit.server_args import DEFAULT_MODEL_NAME
from toolkit.service.model_source import bundled_model_dir

QUERY = "How do I keep my houseplants alive in winter?"
DOCUMENTS = [
    "The stock market closed higher on Friday after a week of losses.",
    "Water indoor plants less often in winter and keep them away from cold drafts.",
    "A guide to repotting succulents in spring.",
    "Houseplants need bright light during the short days of winter.",
    "The recipe calls for two cups of flour and one egg.",
]


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    running = start_threaded_server(["--max-inputs-per-request", "64"])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference():  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(bundled_model_dir()), device="cpu")


def reference_cosine(reference, first: list[str], second: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    a = reference.encode(first, convert_to_numpy=True, normalize_embeddings=True)
    b = reference.encode(second, convert_to_numpy=True, normalize_embeddings=True)
    return np.asarray((a * b).sum(axis=1) if len(a) == len(b) else b @ a[0])


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_orders_documents_by_the_references_cosine(server, reference, path: str) -> None:
    response = requests.post(
        server.url + path, json={"query": QUERY, "documents": DOCUMENTS, "top_n": 3}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference_cosine(reference, [QUERY], DOCUMENTS)
    order = [result["index"] for result in body["results"]]
    assert order == list(np.argsort(-expected)[:3])
    got = np.array([result["relevance_score"] for result in body["results"]])
    assert np.abs(got - expected[order]).max() <= 1e-5
    assert body["results"][0]["document"] == {"text": DOCUMENTS[order[0]]}
    assert body["model"] == DEFAULT_MODEL_NAME and body["usage"]["total_tokens"] > 0


def test_rerank_takes_document_objects_and_can_leave_documents_out(server) -> None:
    documents = [{"text": text} for text in DOCUMENTS]
    body = requests.post(
        server.url + "/rerank",
        json={"query": QUERY, "documents": documents, "return_documents": False},
        timeout=60,
    ).json()
    assert sorted(result["index"] for result in body["results"]) == list(range(len(DOCUMENTS)))
    assert all("document" not in result for result in body["results"])
    scores = [result["relevance_score"] for result in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_score_one_against_many_and_pairwise(server, reference) -> None:
    one_to_many = requests.post(
        server.url + "/v1/score", json={"text_1": QUERY, "text_2": DOCUMENTS}, timeout=60
    ).json()
    got = np.array([item["score"] for item in one_to_many["data"]])
    assert np.abs(got - reference_cosine(reference, [QUERY], DOCUMENTS)).max() <= 1e-5
    pairs = requests.post(
        server.url + "/score", json={"text_1": DOCUMENTS[:2], "text_2": DOCUMENTS[2:4]}, timeout=60
    ).json()
    got = np.array([item["score"] for item in pairs["data"]])
    assert np.abs(got - reference_cosine(reference, DOCUMENTS[:2], DOCUMENTS[2:4])).max() <= 1e-5
    assert [item["index"] for item in pairs["data"]] == [0, 1]


def test_cohere_sdk_embeds_every_type_and_reranks(server, reference) -> None:
    import cohere
    import httpx

    with httpx.Client(timeout=60) as http:
        client = cohere.ClientV2(api_key="unused", base_url=server.url, httpx_client=http)
        check_cohere_client(client, reference)


def check_cohere_client(client, reference) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import quantize_embeddings

    types = ["float", "int8", "uint8", "binary", "ubinary"]
    response = client.embed(
        texts=DOCUMENTS, model=DEFAULT_MODEL_NAME, input_type="search_document", embedding_types=types
    )
    floats = np.array(response.embeddings.float_, dtype=np.float32)
    expected = reference.encode(DOCUMENTS, convert_to_numpy=True)
    assert np.abs(floats - expected).max() <= 1e-5
    for kind in ("binary", "ubinary"):
        got = np.array(getattr(response.embeddings, kind))
        np.testing.assert_array_equal(got, quantize_embeddings(floats, precision=kind))
    int8 = np.array(response.embeddings.int8)
    uint8 = np.array(response.embeddings.uint8)
    np.testing.assert_array_equal(uint8, int8 + 128)
    assert np.abs(int8).max() == 127
    cosines = (int8 * floats).sum(1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(floats, axis=1)
    assert cosines.min() >= 0.999

    ranked = client.rerank(model=DEFAULT_MODEL_NAME, query=QUERY, documents=DOCUMENTS, top_n=2)
    expected_order = list(np.argsort(-reference_cosine(reference, [QUERY], DOCUMENTS))[:2])
    assert [result.index for result in ranked.results] == expected_order


def test_int8_bytes_depend_on_the_vector_alone(server) -> None:
    """Each vector is scaled on its own (its largest magnitude to 127), so its bytes do not depend
    on the batch. The floats themselves may differ in their last bits between a batch and a lone
    input (other kernel shapes), which can move a component across a rounding boundary: by one."""

    def embed(texts: list[str]) -> dict[str, np.ndarray]:
        body = {"texts": texts, "embedding_types": ["float", "int8", "binary"]}
        answer = requests.post(server.url + "/v2/embed", json=body, timeout=60).json()["embeddings"]
        return {kind: np.array(rows) for kind, rows in answer.items()}

    alone, batch = embed(DOCUMENTS[1:2]), embed(DOCUMENTS)
    for result in (alone, batch):
        floats = result["float"]
        expected = np.rint(floats * 127 / np.abs(floats).max(axis=1, keepdims=True))
        np.testing.assert_array_equal(result["int8"], expected)
    assert np.abs(alone["int8"][0] - batch["int8"][1]).max() <= 1
    assert (alone["binary"][0] != batch["binary"][1]).sum() <= 1


def test_openai_route_returns_a_compact_type_on_request(server) -> None:
    body = {"input": DOCUMENTS[:2], "embedding_type": "ubinary"}
    data = requests.post(server.url + "/v1/embeddings", json=body, timeout=60).json()["data"]
    cohere_body = {"texts": DOCUMENTS[:2], "embedding_types": ["ubinary"], "truncate": "NONE"}
    cohere_data = requests.post(server.url + "/v2/embed", json=cohere_body, timeout=60).json()
    assert [item["embedding"] for item in data] == cohere_data["embeddings"]["ubinary"]
    assert len(data[0]["embedding"]) == 384 // 8


def test_cohere_route_advises_its_own_truncation_field(server) -> None:
    body = {"texts": ["word " * 400], "truncate": "NONE"}
    answer = requests.post(server.url + "/v2/embed", json=body, timeout=60)
    assert answer.status_code == 400 and '"truncate": "END"' in answer.json()["error"]["message"]


def test_tokenize_and_detokenize_match_the_models_tokenizer(server) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    one = requests.post(server.url + "/tokenize", json={"prompt": QUERY}, timeout=60).json()
    assert one["tokens"] == tokenizer(QUERY)["input_ids"]
    assert one["count"] == len(one["tokens"]) and one["max_model_len"] == 256
    many = requests.post(
        server.url + "/tokenize", json={"prompt": DOCUMENTS[:2], "add_special_tokens": False}, timeout=60
    ).json()
    assert many["tokens"] == [
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in DOCUMENTS[:2]
    ]
    assert many["count"] == [len(ids) for ids in many["tokens"]]
    text = requests.post(
        server.url + "/detokenize", json={"tokens": one["tokens"], "skip_special_tokens": True}, timeout=60
    ).json()["prompt"]
    assert text == tokenizer.decode(one["tokens"], skip_special_tokens=True)


def test_a_long_text_is_counted_beyond_the_context(server) -> None:
    text = "word " * 1000
    body = requests.post(server.url + "/tokenize", json={"prompt": text}, timeout=60).json()
    assert body["count"] == 1002 > body["max_model_len"]


def test_the_engine_reranks_and_scores_by_cosine(reference) -> None:
    from toolkit import Engine

    expected = reference_cosine(reference, [QUERY], DOCUMENTS)
    with Engine(device="cpu", cpu_workers=1) as engine:
        ranked = engine.rerank(QUERY, DOCUMENTS, top_n=2)
        scores = engine.score(QUERY, DOCUMENTS)
    assert np.abs(scores - expected).max() <= 1e-5
    assert [r["index"] for r in ranked] == list(np.argsort(-expected)[:2])
