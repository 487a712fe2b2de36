"""Client-side helpers for HTTP tests: post embeddings, read vectors and rerank scores, check the
OpenAI error shape."""

from __future__ import annotations

from typing import Any

import numpy as np


def embed(client: Any, **body: Any) -> Any:
    return client.post("/v1/embeddings", json=body)


def vectors(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def rerank_scores(response: Any, count: int) -> np.ndarray:
    """A /v1/rerank answer's scores, by the index of the document each one scores."""
    assert response.status_code == 200, response.text
    scores = np.zeros(count, dtype=np.float32)
    for result in response.json()["results"]:
        scores[result["index"]] = result["relevance_score"]
    return scores


def assert_openai_error(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error
