"""Cross-encoders (rerankers) served on /v1/rerank and /v1/score, checked against
sentence-transformers' `CrossEncoder.predict` on tiny random models of each family we run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.api_calls import assert_openai_error, rerank_scores
from tests.helpers.model_zoo import build_tiny_model
from tests.helpers.servers import start_test_client

QUERY = "How do I keep my houseplants alive in winter?"
DOCUMENTS = [
    "The stock market closed higher on Friday after a week of losses.",
    "Water indoor plants less often in winter and keep them away from cold drafts.",
    "A guide to repotting succulents in spring.",
    "Le café était fermé, 東京は日本の首都です 🙂",
    "ok",
]
LONG = "Houseplants need bright light during the short days of winter. " * 12


@pytest.fixture(scope="module", params=["bert", "xlm-roberta"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from sentence_transformers import CrossEncoder

    root = tmp_path_factory.mktemp(request.param)
    model = CrossEncoder(str(build_tiny_model(request.param, root / "base")), num_labels=1, device="cpu")
    model.save(str(root / "reranker"))
    reference = CrossEncoder(str(root / "reranker"), device="cpu")
    client = start_test_client(["--model-path", str(root / "reranker")])
    yield client, reference
    client.__exit__(None, None, None)


def test_rerank_scores_match_cross_encoder_predict(served) -> None:
    client, reference = served
    answer = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    expected = reference.predict([(QUERY, doc) for doc in DOCUMENTS])
    got = rerank_scores(answer, len(DOCUMENTS))
    assert np.abs(got - expected).max() <= 1e-5
    results = answer.json()["results"]
    assert [r["relevance_score"] for r in results] == sorted(got.tolist(), reverse=True)


def test_a_pair_alone_scores_as_in_a_mixed_batch(served) -> None:
    client, _ = served
    alone = client.post("/v1/score", json={"text_1": QUERY, "text_2": [DOCUMENTS[1]]}).json()["data"]
    mixed = client.post(
        "/v1/score", json={"text_1": [QUERY, "a", QUERY], "text_2": [LONG[:60], "b", DOCUMENTS[1]]}
    ).json()["data"]
    assert abs(alone[0]["score"] - mixed[2]["score"]) <= 1e-6


def test_score_pairs_match_cross_encoder_predict(served) -> None:
    client, reference = served
    firsts, seconds = DOCUMENTS[:3], DOCUMENTS[2:5]
    data = client.post("/score", json={"text_1": firsts, "text_2": seconds}).json()["data"]
    expected = reference.predict(list(zip(firsts, seconds, strict=True)))
    assert np.abs(np.array([item["score"] for item in data]) - expected).max() <= 1e-5


def test_an_over_long_pair_is_refused_or_cut_as_the_reference_cuts(served) -> None:
    client, reference = served
    refused = client.post("/v1/rerank", json={"query": QUERY, "documents": [LONG]})
    assert assert_openai_error(refused, 400, "documents")["code"] == "context_length_exceeded"
    answer = client.post("/v1/rerank", json={"query": QUERY, "documents": [LONG, "ok"], "truncate": True})
    assert answer.status_code == 200, answer.text
    got = {r["index"]: r["relevance_score"] for r in answer.json()["results"]}
    expected = reference.predict([(QUERY, LONG), (QUERY, "ok")])
    assert np.abs(np.array([got[0], got[1]]) - expected).max() <= 1e-5


def test_an_over_long_query_is_named_in_the_refusal(served) -> None:
    client, _ = served
    refused = client.post("/v1/rerank", json={"query": LONG, "documents": ["ok"]})
    assert "query and documents[0]" in assert_openai_error(refused, 400, "documents")["message"]


def test_a_cross_encoder_says_what_it_serves_and_refuses_to_embed(served) -> None:
    client, _ = served
    assert client.get("/v1/models").json()["data"][0]["task"] == "rerank"
    assert client.get("/get_model_info").json()["task"] == "rerank"
    refused = client.post("/v1/embeddings", json={"input": "hello"})
    assert "cross-encoder" in assert_openai_error(refused, 400, "input")["message"]
    assert client.post("/v2/embed", json={"texts": ["hello"]}).status_code == 400


def test_wait_for_server_sees_a_cross_encoder_ready(served) -> None:
    from contextlib import nullcontext

    from toolkit.readiness import probe

    client, _ = served

    class Session:  # requests' interface over the in-process client
        def get(self, url: str, **_: Any) -> Any:
            return nullcontext(client.get(url.removeprefix("http://test")))

        def post(self, url: str, json: Any, **_: Any) -> Any:
            return nullcontext(client.post(url.removeprefix("http://test"), json=json))

    assert probe(Session(), "http://test", None, has_key=False) is None  # type: ignore[arg-type]


def test_model_dir_without_sentence_transformers_files_is_a_cross_encoder_too(tmp_path: Path) -> None:
    from toolkit.service.model_spec import read_embedding_spec

    spec = read_embedding_spec(classifier_dir("bert", tmp_path))
    assert (spec.task, spec.activation, spec.pooling_modes, spec.normalize) == (
        "rerank",
        "sigmoid",
        ("cls",),
        False,
    )


def test_the_engine_reranks_and_scores_as_the_server(served, tmp_path: Path) -> None:
    from toolkit import Engine

    client, reference = served
    model_path = client.state.model_path
    with Engine(model_path, device="cpu", cpu_workers=1) as engine:
        ranked = engine.rerank(QUERY, DOCUMENTS, top_n=3)
        assert len(engine.rerank(QUERY, DOCUMENTS[1])) == 1  # one document, not its characters
        scores = engine.score(QUERY, DOCUMENTS)
    expected = reference.predict([(QUERY, doc) for doc in DOCUMENTS])
    assert np.abs(scores - expected).max() <= 1e-5
    assert [r["index"] for r in ranked] == list(np.argsort(-expected)[:3])


def test_is_reranker_insists_on_a_cross_encoder_and_overrides_are_refused(served) -> None:
    from toolkit.errors import ModelLoadError
    from toolkit.service.model_files import read_model_files
    from toolkit.service.model_source import bundled_model_dir

    reranker = served[0].state.model_path
    assert read_model_files(reranker, reranker=True).spec.is_cross_encoder
    with pytest.raises(ModelLoadError, match="not a cross-encoder"):
        read_model_files(str(bundled_model_dir()), reranker=True)
    with pytest.raises(ModelLoadError, match="--pooling and --normalize do not apply"):
        read_model_files(reranker, pooling="mean")


def classifier_dir(family: str, dest: Path, labels: int = 1) -> Path:
    from transformers import AutoModelForSequenceClassification

    base = build_tiny_model(family, dest / "base")
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=labels)
    model.save_pretrained(str(dest / "plain"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dest / "plain" / name).write_bytes((base / name).read_bytes())
    return dest / "plain"


@pytest.mark.parametrize(
    ("family", "labels", "message"),
    [("modernbert", 1, "not served yet"), ("qwen2", 1, "bidirectional"), ("bert", 3, "has 3 labels")],
)
def test_cross_encoders_we_cannot_score_are_refused_at_start(
    family: str, labels: int, message: str, tmp_path: Path
) -> None:
    from toolkit.errors import ModelLoadError
    from toolkit.service.model_spec import read_embedding_spec

    with pytest.raises(ModelLoadError, match=message):
        read_embedding_spec(classifier_dir(family, tmp_path, labels))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_decoder_classifiers_score_as_cross_encoder_predict(family: str, tmp_path: Path) -> None:
    """Qwen3-Reranker's sequence-classification conversions: the last token that is not padding
    (the tiny Qwen3 appends its pad token, as transformers must skip) through `score`."""
    from sentence_transformers import CrossEncoder

    path = classifier_dir(family, tmp_path)
    client = start_test_client(["--model-path", str(path)])
    try:
        answer = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    finally:
        client.__exit__(None, None, None)
    expected = CrossEncoder(str(path), device="cpu").predict([(QUERY, doc) for doc in DOCUMENTS])
    assert np.abs(rerank_scores(answer, len(DOCUMENTS)) - expected).max() <= 1e-5


def test_a_bi_encoder_on_a_classifier_checkpoint_still_embeds(tmp_path: Path) -> None:
    import json

    from toolkit.service.model_spec import read_embedding_spec

    model_dir = build_tiny_model("bert", tmp_path / "bi")  # sentence-transformers files, Pooling
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (model_dir / "config.json").write_text(json.dumps(config))
    assert read_embedding_spec(model_dir).task == "embed"


@pytest.mark.slow  # two front-end processes and an engine
def test_pairs_cross_to_the_engine_process_with_their_token_types(served) -> None:
    """With --http-workers the front ends tokenize the pairs and send ids and segment starts over
    the wire: the scores must be the same as in one process."""
    import requests

    from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

    client, reference = served
    command = f"python3 -m toolkit.launch_server --model-path {client.state.model_path} --http-workers 2"
    process, port = launch_server_cmd(command + " --log-level warning", host="127.0.0.1")
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=120, process=process)
        body = {"text_1": QUERY, "text_2": DOCUMENTS}
        data = requests.post(f"http://127.0.0.1:{port}/v1/score", json=body, timeout=60).json()["data"]
    finally:
        terminate_process(process)
    expected = reference.predict([(QUERY, doc) for doc in DOCUMENTS])
    assert np.abs(np.array([item["score"] for item in data]) - expected).max() <= 1e-5
