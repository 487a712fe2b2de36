"""The bundled all-MiniLM-L6-v2 against sentence-transformers, through the server's own engine."""

from __future__ import annotations

import numpy as np
import pytest

FIDELITY_TEXTS = [
    "Once upon a time",
    "A man is eating food.",
    "The new movie is awesome, I loved every minute of it!",
    "Quantum entanglement links particles across arbitrary distances.",
    "naïve café résumé — unicode, accents and em dashes",
    "x",
    "1234567890 !@#$%^&*()",
    "Mixed CASE and   extra   spaces\tand\ttabs\nand newlines.",
    "的 中文 文本 also works",
    " ".join(["vector"] * 120),
]


@pytest.fixture(scope="module")
def reference():  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    from toolkit.service.model_source import bundled_model_dir

    return SentenceTransformer(str(bundled_model_dir()), device="cpu")


def near_limit_text(tokenizer, limit: int) -> str:  # type: ignore[no-untyped-def]
    """A text that tokenizes to exactly `limit` tokens, special tokens included."""
    words = ["alpha", "beta", "gamma", "delta"]
    text = ""
    i = 0
    while True:
        candidate = (text + " " + words[i % 4]).strip()
        if len(tokenizer.encode([candidate])[0]) > limit:
            return text
        text, i = candidate, i + 1


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_sentence_transformers(minilm_client, reference) -> None:
    engine = minilm_client.state.service
    texts = [*FIDELITY_TEXTS, near_limit_text(engine.tokenizer, engine.limits.context_length)]
    assert len(engine.tokenizer.encode([texts[-1]])[0]) == 256
    ours = np.array(
        [d["embedding"] for d in minilm_client.post("/v1/embeddings", json={"input": texts}).json()["data"]],
        dtype=np.float32,
    )
    expected = reference.encode(texts, convert_to_numpy=True, batch_size=4)
    assert cosines(ours, expected).min() >= 0.99999
    assert np.abs(ours - expected).max() <= 1e-5


def test_one_input_alone_equals_it_inside_a_batch(minilm_client) -> None:
    batch = minilm_client.post("/v1/embeddings", json={"input": FIDELITY_TEXTS}).json()["data"]
    for index in (0, 3, 9):
        alone = minilm_client.post("/v1/embeddings", json={"input": FIDELITY_TEXTS[index]}).json()["data"]
        np.testing.assert_allclose(alone[0]["embedding"], batch[index]["embedding"], rtol=0, atol=1e-6)
