"""Decoder rerankers (Qwen3-Reranker and its kind): a sentence-transformers CrossEncoder folder over a
causal LM (its chat template, then LogitScore) checked against `CrossEncoder.predict`, and a plain
causal-LM folder served with --is-reranker checked against the Qwen3-Reranker model card's recipe,
on tiny random Qwen3 models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.api_calls import assert_openai_error, rerank_scores
from tests.helpers.head_models import build_causal_lm, save_chat_reranker
from tests.helpers.servers import start_test_client

QUERY = "How do I keep my houseplants alive in winter?"
DOCUMENTS = [
    "The stock market closed higher on Friday after a week of losses.",
    "Water indoor plants less often in winter and keep them away from cold drafts.",
    "Le café était fermé, 東京は日本の首都です 🙂",
    "ok",
]
LONG = "Houseplants need bright light during the short days of winter. " * 30


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("decoder-reranker"))


@pytest.fixture(scope="module")
def st_reranker(causal_lm: Path) -> Iterator[tuple[Any, Any]]:
    from sentence_transformers import CrossEncoder

    path = save_chat_reranker(causal_lm, causal_lm.parent / "st")
    reference = CrossEncoder(str(path), device="cpu")
    client = start_test_client(["--model-path", str(path)])
    yield client, reference
    client.__exit__(None, None, None)


def test_chat_template_reranker_matches_cross_encoder(st_reranker) -> None:
    client, reference = st_reranker
    got = rerank_scores(
        client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS}), len(DOCUMENTS)
    )
    expected = reference.predict([(QUERY, doc) for doc in DOCUMENTS])
    assert np.abs(got - expected).max() <= 1e-5
    assert client.get("/v1/models").json()["data"][0]["task"] == "rerank"


def test_chat_template_pair_alone_scores_as_in_a_batch(st_reranker) -> None:
    client, _ = st_reranker
    alone = client.post("/v1/score", json={"text_1": QUERY, "text_2": [DOCUMENTS[1]]}).json()["data"]
    mixed = client.post(
        "/v1/score", json={"text_1": [QUERY, "a", QUERY], "text_2": [LONG[:80], "b", DOCUMENTS[1]]}
    ).json()["data"]
    assert abs(alone[0]["score"] - mixed[2]["score"]) <= 1e-6


def test_chat_template_truncation_keeps_the_template_tail(st_reranker) -> None:
    client, reference = st_reranker
    refused = client.post("/v1/rerank", json={"query": QUERY, "documents": [LONG]})
    assert assert_openai_error(refused, 400, "documents")["code"] == "context_length_exceeded"
    cut = client.post("/v1/rerank", json={"query": QUERY, "documents": [LONG, "ok"], "truncate": True})
    expected = reference.predict([(QUERY, LONG), (QUERY, "ok")])
    assert np.abs(rerank_scores(cut, 2) - expected).max() <= 1e-5


def test_requests_a_decoder_reranker_cannot_serve_are_refused(st_reranker) -> None:
    client, _ = st_reranker
    assert_openai_error(client.post("/v1/embeddings", json={"input": "a"}), 400, "input")
    chat = client.post("/v1/rerank", json={"query": QUERY, "documents": ["a"], "instruction": "Find it"})
    assert_openai_error(chat, 400, "instruction")


def model_card_scores(path: Path, pairs: list[tuple[str, str]], instruction: str | None = None) -> np.ndarray:
    """The Qwen3-Reranker model card's transformers recipe, as its card writes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
        'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
    task = instruction or "Given a web search query, retrieve relevant passages that answer the query"
    texts = [f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {doc}" for query, doc in pairs]
    inputs = tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False)
    inputs["input_ids"] = [prefix_ids + ids + suffix_ids for ids in inputs["input_ids"]]
    padded = tokenizer.pad(inputs, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**padded).logits[:, -1, :]
    scores = torch.log_softmax(torch.stack([logits[:, no], logits[:, yes]], dim=1), dim=1)
    return scores[:, 1].exp().numpy()


def test_plain_causal_lm_with_is_reranker_matches_the_model_card(causal_lm: Path) -> None:
    pairs = [(QUERY, doc) for doc in DOCUMENTS]
    client = start_test_client(["--model-path", str(causal_lm), "--is-reranker"])
    try:
        default = rerank_scores(
            client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS}), len(DOCUMENTS)
        )
        told = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, "instruction": "Find plants"}
        )
    finally:
        client.__exit__(None, None, None)
    assert np.abs(default - model_card_scores(causal_lm, pairs)).max() <= 1e-5
    assert (
        np.abs(rerank_scores(told, len(DOCUMENTS)) - model_card_scores(causal_lm, pairs, "Find plants")).max()
        <= 1e-5
    )


def test_a_causal_lm_without_the_flag_is_an_embedder(causal_lm: Path) -> None:
    client = start_test_client(["--model-path", str(causal_lm)])
    try:
        task = client.get("/v1/models").json()["data"][0]["task"]
        embedded = client.post("/v1/embeddings", json={"input": "a"})
    finally:
        client.__exit__(None, None, None)
    assert task == "embed" and embedded.status_code == 200


def test_a_template_tail_is_not_restored_where_the_folder_says_so(causal_lm: Path, tmp_path: Path) -> None:
    import json

    from sentence_transformers import CrossEncoder

    path = save_chat_reranker(causal_lm, tmp_path / "no-restore")
    settings = path / "sentence_bert_config.json"
    config = json.loads(settings.read_text())
    config["processing_kwargs"] = {"chat_template": {"restore_suffix": False}}
    settings.write_text(json.dumps(config))
    client = start_test_client(["--model-path", str(path)])
    try:
        cut = client.post("/v1/rerank", json={"query": QUERY, "documents": [LONG], "truncate": True})
    finally:
        client.__exit__(None, None, None)
    expected = CrossEncoder(str(path), device="cpu").predict([(QUERY, LONG)])
    assert np.abs(rerank_scores(cut, 1) - expected).max() <= 1e-5


def test_is_reranker_refuses_an_embedding_folder_and_instructions_are_bounded(st_reranker) -> None:
    from tests.helpers.model_zoo import build_tiny_model
    from toolkit.errors import ModelLoadError
    from toolkit.service.model_files import read_model_files

    client, _ = st_reranker
    long = client.post("/v1/rerank", json={"query": QUERY, "documents": ["a"], "instruction": "x" * 5000})
    assert_openai_error(long, 400)
    embedder = build_tiny_model("qwen3", Path(client.state.model_path).parent / "embedder")
    with pytest.raises(ModelLoadError, match="sentence-transformers embedding model"):
        read_model_files(str(embedder), reranker=True)
