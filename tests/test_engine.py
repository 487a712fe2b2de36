"""`toolkit.Engine`: the server's inference service in-process, with the server's results."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.helpers.api_calls import vectors
from toolkit import Engine
from toolkit.errors import ContextLengthExceededError
from toolkit.process.embedded import CHUNK_SIZE, CHUNKS_IN_FLIGHT

TEXTS = [f"Sentence number {i} about {'cats' if i % 3 else 'the stock market'}." for i in range(700)]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine(device="cpu") as started:
        yield started


def _assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    cos = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert cos.min() >= 0.99999 and np.abs(ours - reference).max() <= 1e-5


def test_encode_matches_sentence_transformers_in_order(engine: Engine, minilm_dir) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)
    ours = engine.encode(TEXTS)  # 700 texts: three chunks, in flight together
    assert ours.shape == (700, 384) and ours.dtype == np.float32
    _assert_close(ours, reference)
    _assert_close(engine.encode(TEXTS[0]), reference[0])  # one text: one vector, as ST gives


def test_the_engine_gives_exactly_what_the_server_gives(engine: Engine, minilm_client) -> None:  # type: ignore[no-untyped-def]
    served = vectors(minilm_client.post("/v1/embeddings", json={"input": TEXTS[:50], "dimensions": 128}))
    np.testing.assert_array_equal(engine.encode(TEXTS[:50], dimensions=128), served)


def test_token_ids_prompts_and_options(engine: Engine) -> None:
    ids = engine.service.tokenizer.encode(TEXTS[:2])
    np.testing.assert_allclose(engine.encode(ids), engine.encode(TEXTS[:2]), atol=1e-6)
    np.testing.assert_allclose(engine.encode(ids[0]), engine.encode(TEXTS[0]), atol=1e-6)
    prompted = engine.encode(TEXTS[:2], prompt="query: ")
    np.testing.assert_allclose(prompted, engine.encode(["query: " + t for t in TEXTS[:2]]), atol=1e-6)
    long_text = "word " * 1000
    with pytest.raises(ContextLengthExceededError):
        engine.encode(long_text)
    assert engine.encode(long_text, truncate=True).shape == (384,)


def test_normalize_is_applied_or_refused_as_the_model_allows(engine: Engine) -> None:
    with pytest.raises(ValueError, match="normalize=False"):
        engine.encode(TEXTS[:2], normalize=False)
    with Engine(device="cpu", normalize=False, cpu_workers=1) as raw:
        unnormalized = raw.encode(TEXTS[:3])
        assert not np.allclose(np.linalg.norm(unnormalized, axis=1), 1.0)
        normalized = raw.encode(TEXTS[:3], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(normalized, engine.encode(TEXTS[:3]), atol=1e-6)


def test_stream_reads_its_inputs_lazily_and_keeps_their_order(engine: Engine) -> None:
    read = 0

    def texts() -> Iterator[str]:
        nonlocal read
        for text in TEXTS * 3:
            read += 1
            yield text

    chunks = engine.stream(texts(), chunk_size=CHUNK_SIZE)
    first = next(chunks)
    # No more was read than the chunks in flight and the one that made room for the first answer.
    assert read <= (CHUNKS_IN_FLIGHT + 1) * CHUNK_SIZE < len(TEXTS) * 3
    rows = np.concatenate([first, *chunks])
    assert rows.shape == (2100, 384)
    np.testing.assert_array_equal(rows[700:1400], rows[:700])


def test_options_are_the_servers_and_close_is_final() -> None:
    with pytest.raises(TypeError, match="unknown Engine options"):
        Engine(device="cpu", max_batch_tokenz=10)
    engine = Engine(device="cpu", cpu_workers=1)
    assert engine.encode("hello").shape == (384,)
    engine.close()
    engine.close()
    with pytest.raises(RuntimeError):
        engine.encode("hello")


def test_an_engine_dropped_unclosed_stops_its_thread() -> None:
    import gc

    engine = Engine(device="cpu", cpu_workers=1)
    engine.encode("hello")
    thread = engine._thread
    del engine
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_an_engine_left_open_at_exit_closes_quietly() -> None:
    import subprocess
    import sys

    script = "from toolkit import Engine\nengine = Engine(device='cpu')\nprint(engine.encode('hi').shape)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(384,)"
    assert "Task was destroyed" not in done.stderr and "Traceback" not in done.stderr, done.stderr
