"""Folders as today's sentence-transformers saves them: the maximum length lives in the tokenizer's
`model_max_length`, not in `sentence_bert_config.json`. The server must truncate (or refuse)
exactly where sentence-transformers does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.api_calls import assert_openai_error
from tests.helpers.model_zoo import assert_embeddings_close, build_tiny_model
from tests.helpers.servers import start_test_client

LIMIT = 24  # below every tiny model's position limit
LONG = "Embedding models turn sentences into vectors, one after another. " * 6


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_a_limit_saved_by_sentence_transformers_6_is_the_servers(family: str, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    original = SentenceTransformer(str(build_tiny_model(family, tmp_path / "built")), device="cpu")
    original.max_seq_length = LIMIT
    original.save(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    assert "max_seq_length" not in json.loads((saved / "sentence_bert_config.json").read_text())
    reference = SentenceTransformer(str(saved), device="cpu")
    assert reference.max_seq_length == LIMIT
    assert len(reference.tokenizer(LONG)["input_ids"]) > LIMIT

    client = start_test_client(["--model-path", str(saved)])
    try:
        assert client.get("/get_model_info").json()["max_model_len"] == LIMIT
        refused = client.post("/v1/embeddings", json={"input": LONG})
        assert assert_openai_error(refused, 400, "input")["code"] == "context_length_exceeded"
        answer = client.post("/v1/embeddings", json={"input": [LONG, "short"], "truncate": True})
        assert answer.status_code == 200, answer.text
        served = np.array([item["embedding"] for item in answer.json()["data"]], dtype=np.float32)
    finally:
        client.__exit__(None, None, None)
    expected = reference.encode([LONG, "short"], convert_to_tensor=True).cpu()
    assert_embeddings_close(torch.from_numpy(served), expected)
