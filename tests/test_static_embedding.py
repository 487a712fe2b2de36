"""sentence-transformers' StaticEmbedding models (static-retrieval-mrl, model2vec) served over
HTTP and compared with SentenceTransformer.encode on a random table over the bundled tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.api_calls import assert_openai_error
from tests.helpers.model_zoo import assert_embeddings_close
from tests.helpers.servers import start_test_client
from toolkit.service.model_source import bundled_model_dir

TEXTS = ["hello", "The quick brown fox jumps over the lazy dog.", "Le café 東京 🙂 naïve — 3.14 " * 20]


@pytest.fixture(scope="module")
def static_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any]]:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding
    from tokenizers import Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.from_file(str(bundled_model_dir() / "tokenizer.json"))
    modules = [StaticEmbedding(tokenizer, embedding_dim=32), Normalize()]
    path = tmp_path_factory.mktemp("static") / "model"
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    settings = path / "config_sentence_transformers.json"
    config = json.loads(settings.read_text()) | {"prompts": {"query": "query: ", "document": ""}}
    settings.write_text(json.dumps(config))
    reference = SentenceTransformer(str(path), device="cpu")
    yield path, reference


def test_static_embeddings_match_sentence_transformers(static_model) -> None:
    path, reference = static_model
    client = start_test_client(["--model-path", str(path)])
    try:
        refused = client.post("/v1/embeddings", json={"input": TEXTS})
        batch = client.post("/v1/embeddings", json={"input": TEXTS, "truncate": True}).json()["data"]
        alone = client.post("/v1/embeddings", json={"input": TEXTS[1]}).json()["data"]
        query = client.post("/v1/embeddings", json={"input": TEXTS[:2], "prompt_name": "query"}).json()[
            "data"
        ]
        counted = client.post("/tokenize", json={"prompt": TEXTS[0]}).json()
        blank = client.post("/v1/embeddings", json={"input": ["ok", "   "]})
    finally:
        client.__exit__(None, None, None)
    # Where its saved tokenizer.json truncates (128 tokens here), sentence-transformers cuts
    # silently; the server refuses unless asked to cut, then cuts there.
    assert assert_openai_error(refused, 400, "input")["code"] == "context_length_exceeded"
    served = torch.tensor([item["embedding"] for item in batch])
    assert_embeddings_close(served, reference.encode(TEXTS, convert_to_tensor=True).cpu())
    assert np.abs(np.array(alone[0]["embedding"]) - served[1].numpy()).max() <= 1e-6
    expected = reference.encode(TEXTS[:2], prompt_name="query", convert_to_tensor=True).cpu()
    assert_embeddings_close(torch.tensor([item["embedding"] for item in query]), expected)
    # StaticEmbedding tokenizes without special tokens: so do the server and /tokenize.
    assert counted["tokens"] == reference[0].tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
    assert "holds no token" in assert_openai_error(blank, 400, "input")["message"]
