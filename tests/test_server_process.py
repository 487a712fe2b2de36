"""End to end against a real server process: the openai client, requests, curl, api keys, start-up errors."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import requests

from toolkit.server_args import DEFAULT_MODEL_NAME
from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

pytestmark = pytest.mark.subprocess

TEXTS = ["Once upon a time", "A second, somewhat longer input text."]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    process, port = launch_server_cmd("python3 -m toolkit.launch_server --is-embedding", host="127.0.0.1")
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=180, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        terminate_process(process)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from toolkit.service.model_source import bundled_model_dir

    model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    return model.encode(TEXTS, convert_to_numpy=True)


def assert_close_to_reference(vectors: np.ndarray, reference: np.ndarray) -> None:
    cos = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() >= 0.99999
    assert np.abs(vectors - reference).max() <= 1e-5


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_openai_client(server: str, reference: np.ndarray, encoding_format: str | None) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = client.embeddings.create(model=DEFAULT_MODEL_NAME, input=TEXTS, **kwargs)
    if encoding_format == "base64":  # the client hands base64 back undecoded when asked explicitly
        vectors = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
    else:
        vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert_close_to_reference(vectors, reference)
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0
    assert response.model == DEFAULT_MODEL_NAME


def test_openai_client_sees_errors(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=DEFAULT_MODEL_NAME, input="")
    assert "empty" in raised.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="not-served", input="hi")


def test_requests(server: str, reference: np.ndarray) -> None:
    response = requests.post(f"{server}/v1/embeddings", json={"model": DEFAULT_MODEL_NAME, "input": TEXTS})
    vectors = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    assert_close_to_reference(vectors, reference)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed on this machine")
def test_curl(server: str, reference: np.ndarray) -> None:
    body = json.dumps({"model": DEFAULT_MODEL_NAME, "input": TEXTS[0]})
    out = subprocess.check_output(
        ["curl", "-s", f"{server}/v1/embeddings", "-H", "Content-Type: application/json", "-d", body]
    )
    vector = np.array(json.loads(out)["data"][0]["embedding"], dtype=np.float32)
    assert_close_to_reference(vector[None], reference[:1])


def test_api_key_guards_every_route_but_health() -> None:
    process, port = launch_server_cmd(
        "python3 -m toolkit.launch_server --api-key sesame --no-warmup", host="127.0.0.1"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(RuntimeError, match="api key"):
            wait_for_server(url, timeout=180, process=process)
        wait_for_server(url, timeout=180, api_key="sesame", process=process)
        assert requests.get(f"{url}/health").status_code == 200
        for method, path in [("get", "/v1/models"), ("get", "/get_model_info"), ("post", "/v1/embeddings")]:
            anonymous = requests.request(method, url + path, json={"input": "hi"})
            assert anonymous.status_code == 401
            assert anonymous.json()["error"]["code"] == "invalid_api_key"
            wrong = requests.request(
                method, url + path, json={"input": "hi"}, headers={"Authorization": "Bearer x"}
            )
            assert wrong.status_code == 401
        good = requests.post(
            f"{url}/v1/embeddings", json={"input": "hi"}, headers={"Authorization": "Bearer sesame"}
        )
        assert good.status_code == 200
    finally:
        terminate_process(process)


def test_missing_model_is_one_clear_line_and_nonzero_exit(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    result = subprocess.run(
        [sys.executable, "-m", "toolkit.launch_server", "--model-path", str(missing), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stdout + result.stderr
    assert str(missing) in errors[0] and "Traceback" not in result.stderr
