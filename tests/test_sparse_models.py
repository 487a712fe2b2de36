"""Sparse models (sentence-transformers' SparseEncoder): SPLADE over BERT, XLM-RoBERTa and MPNet
masked language models, and an inference-free model whose Router sends queries to a SparseStaticEmbedding,
served on /embed_sparse and /v1/embeddings and compared with `SparseEncoder` on tiny random models
saved in today's format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.api_calls import assert_openai_error
from tests.helpers.head_models import build_splade
from tests.helpers.model_zoo import build_tiny_model
from tests.helpers.servers import start_test_client
from toolkit.errors import ModelLoadError
from toolkit.service.model_spec import read_embedding_spec

TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Le café était fermé, 東京は日本の首都です 🙂 " * 3,
    "Embedding models turn sentences into vectors. " * 4,
]
LONG = "Tokenizers split words into pieces: running, runner, runs and ran. " * 20


def save_sparse_encoder(modules: list[Any], path: Path, max_active_dims: int | None = None) -> Path:
    from sentence_transformers import SparseEncoder

    SparseEncoder(modules=modules, device="cpu", max_active_dims=max_active_dims).save(str(path))
    return path


@pytest.fixture(scope="module", params=["bert", "xlm-roberta", "mpnet"])
def splade(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    root = tmp_path_factory.mktemp(request.param)
    mlm = build_splade(request.param, root / "mlm")
    path = save_sparse_encoder(
        [Transformer(str(mlm), transformer_task="fill-mask"), SpladePooling("max")], root / "splade"
    )
    reference = SparseEncoder(str(path), device="cpu")
    client = start_test_client(["--model-path", str(path)])
    yield client, reference
    client.__exit__(None, None, None)


def dense(reference: Any, texts: list[str], **kwargs: Any) -> np.ndarray:
    return reference.encode(texts, convert_to_sparse_tensor=False, **kwargs).cpu().numpy()


def from_pairs(answer: list[list[dict[str, float]]], dim: int) -> np.ndarray:
    out = np.zeros((len(answer), dim), dtype=np.float32)
    for row, pairs in zip(out, answer, strict=True):
        for pair in pairs:
            row[pair["index"]] = pair["value"]
    return out


def assert_sparse_close(answer: list[list[dict[str, float]]], expected: np.ndarray) -> None:
    """Same non-zero indices, in order, and values within 1e-5."""
    for pairs, row in zip(answer, expected, strict=True):
        assert [pair["index"] for pair in pairs] == np.flatnonzero(row).tolist()
    assert np.abs(from_pairs(answer, expected.shape[1]) - expected).max() <= 1e-5


def test_splade_matches_sparse_encoder(splade) -> None:
    client, reference = splade
    answer = client.post("/embed_sparse", json={"inputs": TEXTS})
    assert answer.status_code == 200, answer.text
    expected = dense(reference, TEXTS)
    assert 0 < np.count_nonzero(expected) < expected.size / 2  # sparse enough to mean something
    assert_sparse_close(answer.json(), expected)
    floats = client.post("/v1/embeddings", json={"input": TEXTS}).json()["data"]
    assert np.abs(np.array([item["embedding"] for item in floats]) - expected).max() <= 1e-5
    pairs = client.post("/v1/embeddings", json={"input": TEXTS, "sparse": True}).json()["data"]
    assert_sparse_close([item["embedding"] for item in pairs], expected)


def test_splade_alone_equals_inside_a_mixed_batch(splade) -> None:
    client, _ = splade
    alone = client.post("/embed_sparse", json={"inputs": TEXTS[1]}).json()
    mixed = client.post("/embed_sparse", json={"inputs": [LONG[:300], TEXTS[1], "a"]}).json()
    dim = len(client.post("/v1/embeddings", json={"input": "a"}).json()["data"][0]["embedding"])
    assert np.abs(from_pairs(alone, dim)[0] - from_pairs(mixed, dim)[1]).max() <= 1e-6


def test_splade_from_one_token_to_the_limit_and_past_it(splade) -> None:
    client, reference = splade
    limit = client.get("/v1/models").json()["data"][0]["max_model_len"]
    ids = reference.tokenizer(LONG, add_special_tokens=False)["input_ids"]
    sized = [reference.tokenizer.decode(ids[:n]) for n in (1, limit // 2, limit - 2)]
    assert_sparse_close(client.post("/embed_sparse", json={"inputs": sized}).json(), dense(reference, sized))
    refused = client.post("/embed_sparse", json={"inputs": [LONG]})
    assert assert_openai_error(refused, 400, "inputs")["code"] == "context_length_exceeded"
    cut = client.post("/embed_sparse", json={"inputs": [LONG], "truncate": True})
    assert_sparse_close(cut.json(), dense(reference, [LONG]))


def test_max_active_dims_keeps_what_sparse_encoder_keeps(splade) -> None:
    client, reference = splade
    answer = client.post("/embed_sparse", json={"inputs": TEXTS, "max_active_dims": 2}).json()
    every = np.count_nonzero(dense(reference, TEXTS), axis=1)
    assert [len(pairs) for pairs in answer] == np.minimum(every, 2).tolist()
    assert_sparse_close(answer, dense(reference, TEXTS, max_active_dims=2))


def test_a_sparse_model_says_what_it_serves(splade) -> None:
    from toolkit.execution.assembly import SPARSE_BATCH_BYTES

    client, reference = splade
    # Vocabulary-wide rows: a batch takes no more inputs than fit the byte budget.
    width = reference.get_embedding_dimension()
    assert client.state.service.queue.max_batch_inputs == SPARSE_BATCH_BYTES // (4 * width)
    info = client.get("/get_model_info").json()
    assert info["task"] == "sparse"
    assert info["embedding_dim"] == reference.get_embedding_dimension()
    assert info["sparse"] == {"pooling": "max", "activation": "relu", "routes": None, "max_active_dims": None}
    assert client.get("/v1/models").json()["data"][0]["task"] == "sparse"


def test_sparse_requests_that_cannot_be_served_are_refused(splade) -> None:
    client, _ = splade
    assert_openai_error(
        client.post("/v1/embeddings", json={"input": "a", "dimensions": 8}), 400, "dimensions"
    )
    base64 = client.post("/v1/embeddings", json={"input": "a", "sparse": True, "encoding_format": "base64"})
    assert_openai_error(base64, 400, "sparse")
    assert_openai_error(client.post("/embed_sparse", json={"inputs": "a", "max_active_dims": 0}), 400)
    assert_openai_error(client.post("/embed_sparse", json={"inputs": "a", "input_type": "image"}), 400)
    assert_openai_error(client.post("/embed_sparse", json={"inputs": [1, 2]}), 400, "inputs")


def test_a_dense_model_refuses_sparse_output(tmp_path: Path) -> None:
    client = start_test_client(["--model-path", str(build_tiny_model("bert", tmp_path / "dense"))])
    try:
        route = client.post("/embed_sparse", json={"inputs": "a"})
        flag = client.post("/v1/embeddings", json={"input": "a", "sparse": True})
        top = client.post("/v1/embeddings", json={"input": "a", "max_active_dims": 4})
    finally:
        client.__exit__(None, None, None)
    assert "SparseEncoder" in assert_openai_error(route, 400, "inputs")["message"]
    assert_openai_error(flag, 400, "sparse")
    assert_openai_error(top, 400, "max_active_dims")


@pytest.fixture(scope="module")
def inference_free(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Queries by a SparseStaticEmbedding of random weights, documents by SPLADE (sum, log1p_relu)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Router, Transformer
    from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding, SpladePooling

    root = tmp_path_factory.mktemp("inference-free")
    mlm = build_splade("bert", root / "mlm", seed=3)
    document = Transformer(str(mlm), transformer_task="fill-mask")
    weight = torch.rand(document.tokenizer.vocab_size, generator=torch.Generator().manual_seed(4)) * 3
    query = SparseStaticEmbedding(tokenizer=document.tokenizer, weight=weight, frozen=True)
    router = Router.for_query_document(
        query_modules=[query], document_modules=[document, SpladePooling("sum", "log1p_relu")]
    )
    path = save_sparse_encoder([router], root / "model")
    settings = path / "config_sentence_transformers.json"
    settings.write_text(json.dumps(json.loads(settings.read_text()) | {"prompts": {"query": "query: "}}))
    reference = SparseEncoder(str(path), device="cpu")
    client = start_test_client(["--model-path", str(path)])
    yield client, reference
    client.__exit__(None, None, None)


def test_inference_free_routes_match_sparse_encoder(inference_free) -> None:
    client, reference = inference_free
    documents = dense(reference, TEXTS)
    assert_sparse_close(client.post("/embed_sparse", json={"inputs": TEXTS}).json(), documents)
    queries = reference.encode_query(TEXTS, convert_to_sparse_tensor=False).numpy()
    by_type = client.post("/embed_sparse", json={"inputs": TEXTS, "input_type": "query"}).json()
    assert_sparse_close(by_type, queries)
    by_prompt = client.post("/v1/embeddings", json={"input": TEXTS, "prompt_name": "query"}).json()["data"]
    assert np.abs(np.array([item["embedding"] for item in by_prompt]) - queries).max() <= 1e-6


def test_inference_free_rerank_is_the_dot_product(inference_free) -> None:
    client, reference = inference_free
    answer = client.post("/v1/rerank", json={"query": TEXTS[1], "documents": TEXTS}).json()["results"]
    query = reference.encode_query([TEXTS[1]], convert_to_sparse_tensor=False).numpy()
    expected = (dense(reference, TEXTS) * query).sum(axis=1)
    got = {result["index"]: result["relevance_score"] for result in answer}
    assert np.abs(np.array([got[i] for i in range(len(TEXTS))]) - expected).max() <= 1e-4
    info = client.get("/get_model_info").json()["sparse"]
    assert info["routes"] == {"query": "SparseStaticEmbedding", "document": "SPLADE", "default": "document"}


def test_a_router_we_cannot_run_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "router"
    path.mkdir()
    (path / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "Router"}]))
    routes = {"query": ["query_0_Transformer"], "document": ["document_0_Transformer"]}
    types = {
        name[0]: "sentence_transformers.base.modules.transformer.Transformer" for name in routes.values()
    }
    (path / "router_config.json").write_text(json.dumps({"types": types, "structure": routes}))
    with pytest.raises(ModelLoadError, match="unsupported Router"):
        read_embedding_spec(path)
