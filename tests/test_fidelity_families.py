"""Every model family, served over HTTP, pooled exactly like its references.

Each tiny model from ``model_zoo`` runs behind an in-process server, and its ``/v1/embeddings``
answers are compared with sentence-transformers (``SentenceTransformer.encode``, padded batches)
and with plain transformers (``AutoModel``, one unpadded text at a time). In float32 every row must
reach cosine 0.99999 and every component agree to 1e-5; bfloat16 rows must reach cosine 0.999
against the float32 reference.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.model_zoo import (
    FAMILIES,
    POOLING_MODES,
    PROMPTS,
    WINDOWED_FAMILIES,
    assert_embeddings_close,
    build_fallback_model,
    build_tiny_model,
    read_sentence_transformers_settings,
    reference_embeddings,
    smollm2_model_dir,
    transformers_reference,
    write_sentence_transformers_files,
)
from tests.helpers.servers import start_test_client
from toolkit.models.loader import load_model
from toolkit.models.registry import family_of

TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Le café était fermé, 東京は日本の首都です 🙂 🚀 naïve — def f(x): return x * 3.14!",
    # Long, yet within every model's limit (128 tokens for the encoders).
    "Embedding models turn sentences into vectors. " * 6,
]
# Longer than every limit, with different ends so that cutting left and right differ.
OVER_LONG = "Start: café 東京 🙂. " + "the word " * 150 + "End: numbers 3.14 and 2718."
LITERAL_PROMPT = "Represent this sentence for searching relevant passages: "
# Grown into a text of exactly the context length.
FILLER_WORDS = ["vector", "café", "東京", "search", "3.14", "🙂", "passages"]


@dataclass
class Served:
    model_dir: Path
    client: Any  # fastapi.testclient.TestClient


@contextmanager
def serving(model_dir: Path, *flags: str) -> Iterator[Any]:
    client = start_test_client(["--model-path", str(model_dir), *flags])
    try:
        yield client
    finally:
        client.__exit__(None, None, None)


def embed(client: Any, texts: list[str], **options: Any) -> torch.Tensor:
    response = client.post("/v1/embeddings", json={"input": texts, **options})
    assert response.status_code == 200, response.text
    return torch.tensor([item["embedding"] for item in response.json()["data"]], dtype=torch.float32)


def assert_matches_references(
    ours: torch.Tensor,
    model_dir: Path,
    texts: list[str],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    include_prompt: bool = True,
    truncation_side: str = "right",
) -> None:
    """``ours`` against sentence-transformers and transformers, configured by ``model_dir``'s files."""
    settings = read_sentence_transformers_settings(model_dir)
    expected_st = reference_embeddings(
        model_dir, texts, prompt=prompt, prompt_name=prompt_name, truncation_side=truncation_side
    )
    expected_tf = transformers_reference(
        model_dir,
        texts,
        settings.pooling,
        settings.normalize,
        prompt=PROMPTS[prompt_name] if prompt_name else prompt,
        include_prompt=include_prompt,
        truncation_side=truncation_side,
    )
    assert_embeddings_close(ours, expected_st)
    assert_embeddings_close(ours, expected_tf)


def token_count(client: Any, text: str) -> int:
    return len(client.state.service.tokenizer.encode([text])[0])


def text_at_limit(client: Any) -> str:
    """Words added until one more would pass the server's context length, then " the" to fill up."""
    limit = client.state.service.limits.context_length
    text, index = "", 0
    while True:
        longer = f"{text} {FILLER_WORDS[index % len(FILLER_WORDS)]}".lstrip()
        if token_count(client, longer) > limit:
            break
        text, index = longer, index + 1
    while token_count(client, text) < limit:
        text += " the"
    assert token_count(client, text) == limit
    return text


def write_json(path: Path, **updates: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}, indent=2))


# --- every family, as its directory configures it ------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES + WINDOWED_FAMILIES)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model_dir = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    with serving(model_dir) as client:
        yield Served(model_dir, client)


def test_texts_match_both_references(served: Served) -> None:
    texts = [*TEXTS, text_at_limit(served.client)]
    assert_matches_references(embed(served.client, texts), served.model_dir, texts)


def test_one_text_alone_equals_it_inside_a_batch(served: Served) -> None:
    texts = [*TEXTS, text_at_limit(served.client)]
    batch = embed(served.client, texts).numpy()
    for index, text in enumerate(texts):
        alone = embed(served.client, [text]).numpy()[0]
        np.testing.assert_allclose(alone, batch[index], rtol=0, atol=1e-6)


@pytest.mark.parametrize("how", ["prompt_name", "prompt"])
def test_prompts_match_both_references(served: Served, how: str) -> None:
    options: dict[str, Any] = {"prompt_name": "query"} if how == "prompt_name" else {"prompt": LITERAL_PROMPT}
    ours = embed(served.client, TEXTS, **options)
    assert_matches_references(ours, served.model_dir, TEXTS, **options)


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_matches_references_cut_the_same_way(served: Served, side: str) -> None:
    texts = [OVER_LONG, TEXTS[1]]
    ours = embed(served.client, texts, truncate=True, truncation_side=side)
    assert_matches_references(ours, served.model_dir, texts, truncation_side=side)


def test_over_long_input_is_refused_with_both_lengths(served: Served) -> None:
    limit = served.client.state.service.limits.context_length
    text = text_at_limit(served.client) + " the"
    assert token_count(served.client, text) == limit + 1
    response = served.client.post("/v1/embeddings", json={"input": [TEXTS[0], text]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"{limit + 1} tokens" in error["message"]
    assert f"context length of {limit}" in error["message"]


# --- pooling, prompts and precision, one configuration per server --------------------------------

POOLING_CASES = [
    *[("bert", mode, normalize) for mode in POOLING_MODES for normalize in (True, False)],
    # Left padding in the reference: lasttoken and mean must not read the pads.
    *[("mistral", mode, normalize) for mode in ("lasttoken", "mean") for normalize in (True, False)],
    # One-token modes compute only the pooled tokens in the last layer: with MPNet's relative
    # attention bias, and in a bidirectional decoder (gte-Qwen2 style) where CLS is allowed.
    ("mpnet", "cls", True),
    ("qwen2", "cls", True),
    # A last layer with a window computes every token (ModernBERT's here); a global one (Gemma3's)
    # only the pooled ones.
    ("modernbert", "cls", True),
    ("gemma3", "cls", True),
    ("gemma3", "lasttoken", False),
]


@pytest.mark.parametrize(("family", "mode", "normalize"), POOLING_CASES)
def test_pooling_modes(tmp_path: Path, family: str, mode: str, normalize: bool) -> None:
    model_dir = build_tiny_model(family, tmp_path, pooling=mode, normalize=normalize)
    with serving(model_dir) as client:
        assert_matches_references(embed(client, TEXTS), model_dir, TEXTS)


# Prompt tokens left out of the pool (instructor-style models): encoders and decoders, padded on
# either side in the reference, and every mode whose result depends on which tokens are pooled.
EXCLUDED_PROMPT_CASES = [
    ("bert", "cls"),
    ("mpnet", "mean"),
    ("xlm-roberta", "weightedmean"),
    ("llama", "mean"),
    ("qwen3", "weightedmean"),
    ("mistral", "max"),
]


@pytest.mark.parametrize(("family", "mode"), EXCLUDED_PROMPT_CASES)
def test_prompt_left_out_of_the_pool(tmp_path: Path, family: str, mode: str) -> None:
    model_dir = build_tiny_model(family, tmp_path, pooling=mode)
    write_json(model_dir / "1_Pooling" / "config.json", include_prompt=False)
    with serving(model_dir) as client:
        by_name = embed(client, TEXTS, prompt_name="query")
        literal = embed(client, TEXTS, prompt=LITERAL_PROMPT)
        plain = embed(client, TEXTS)
    assert_matches_references(by_name, model_dir, TEXTS, prompt_name="query", include_prompt=False)
    assert_matches_references(literal, model_dir, TEXTS, prompt=LITERAL_PROMPT, include_prompt=False)
    assert_matches_references(plain, model_dir, TEXTS)


def test_cli_overrides_match_a_directory_that_says_the_same(tmp_path: Path) -> None:
    model_dir = build_tiny_model("bert", tmp_path)
    flags = ["--pooling", "cls", "--no-normalize", "--default-prompt-name", "query"]
    with serving(model_dir, *flags) as client:
        ours = embed(client, TEXTS)
    # The references read the directory's files, so they are rewritten to say what the flags said.
    max_seq_length = read_sentence_transformers_settings(model_dir).max_seq_length
    assert max_seq_length is not None
    write_sentence_transformers_files(
        model_dir, dimension=ours.shape[1], pooling="cls", normalize=False, max_seq_length=max_seq_length
    )
    write_json(model_dir / "config_sentence_transformers.json", default_prompt_name="query")
    assert_matches_references(ours, model_dir, TEXTS, prompt_name="query")


# A global last layer (ModernBERT computes only the pooled rows there), and causal Gemma3 (its
# windows look back only).
WINDOWED_VARIANTS = [
    ("modernbert", "cls", {"global_attn_every_n_layers": 2}),
    ("gemma3", "lasttoken", {"use_bidirectional_attention": False}),
    ("gemma3", "mean", {"use_bidirectional_attention": False}),
]


@pytest.mark.parametrize(("family", "mode", "config"), WINDOWED_VARIANTS)
def test_windowed_variants(tmp_path: Path, family: str, mode: str, config: dict[str, Any]) -> None:
    model_dir = build_tiny_model(family, tmp_path, pooling=mode, **config)
    with serving(model_dir) as client:
        texts = [*TEXTS, text_at_limit(client)]
        assert_matches_references(embed(client, texts), model_dir, texts)


@pytest.mark.parametrize(("family", "include_prompt"), [("xlm-roberta", False), ("mistral", True)])
def test_do_lower_case_lowercases_the_prompt_too(tmp_path: Path, family: str, include_prompt: bool) -> None:
    model_dir = build_tiny_model(family, tmp_path)
    write_json(model_dir / "sentence_bert_config.json", do_lower_case=True)
    write_json(model_dir / "1_Pooling" / "config.json", include_prompt=include_prompt)
    texts = ["The Quick Brown Fox", "Le Café ÉTAIT fermé, ΣΟΦΙΑ 東京"]
    with serving(model_dir) as client:
        ours = embed(client, texts, prompt_name="query")
    # sentence-transformers lowercases in the tokenizer's normalizer, which sees the prompt too;
    # plain transformers is handed the lowercased strings.
    assert_embeddings_close(ours, reference_embeddings(model_dir, texts, prompt_name="query"))
    settings = read_sentence_transformers_settings(model_dir)
    lowered = transformers_reference(
        model_dir,
        [text.lower() for text in texts],
        settings.pooling,
        settings.normalize,
        prompt=PROMPTS["query"].lower(),
        include_prompt=include_prompt,
    )
    assert_embeddings_close(ours, lowered)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "qwen2", "modernbert", "gemma3"])
def test_bfloat16_stays_close_to_the_float32_reference(tmp_path: Path, family: str) -> None:
    model_dir = build_tiny_model(family, tmp_path)
    with serving(model_dir, "--dtype", "bfloat16") as client:
        ours = embed(client, TEXTS)
    # bfloat16 keeps 8 bits of mantissa: only the direction of each row is held to a bar.
    assert_embeddings_close(ours, reference_embeddings(model_dir, TEXTS), min_cosine=0.999, atol=1.0)


@pytest.mark.parametrize("config_file", ["config_sentence_transformers.json", "config.json"])
def test_matryoshka_dimensions(tmp_path: Path, config_file: str) -> None:
    model_dir = build_tiny_model("bert", tmp_path)
    write_json(model_dir / config_file, matryoshka_dimensions=[32, 16])
    expected = reference_embeddings(model_dir, TEXTS)
    with serving(model_dir) as client:
        assert client.get("/get_model_info").json()["matryoshka_dimensions"] == [16, 32]
        for dimensions in (8, 24, 48):
            response = client.post("/v1/embeddings", json={"input": TEXTS, "dimensions": dimensions})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "dimensions"
            assert "[16, 32]" in response.json()["error"]["message"]
        for dimensions in (16, 32, 64):
            ours = embed(client, TEXTS, dimensions=dimensions)
            assert_embeddings_close(ours, F.normalize(expected[:, :dimensions], dim=-1))


# --- a real checkpoint, and an architecture served through transformers ---------------------------
@pytest.mark.slow
def test_smollm2_matches_sentence_transformers() -> None:
    cache = os.environ.get("TOOLKIT_TEST_CACHE")
    model_dir = smollm2_model_dir(Path(cache) if cache else Path.home() / ".cache" / "toolkit-tests")
    # Short texts: a 135M forward costs about a second per hundred tokens on two cores.
    texts = TEXTS[:3]
    # The warm-up embeds a full-context input (seconds on a CPU) and bears on no number here.
    with serving(model_dir, "--no-warmup") as client:
        plain = embed(client, texts)
        queries = embed(client, texts, prompt_name="query")
    assert_embeddings_close(plain, reference_embeddings(model_dir, texts))
    assert_embeddings_close(queries, reference_embeddings(model_dir, texts, prompt_name="query"))


def test_architecture_without_native_forward_falls_back_to_transformers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = build_fallback_model(tmp_path)
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    assert family_of(model_type) is None
    # Loading it directly first fails fast where serving it would only time out.
    assert load_model(model_dir, torch.device("cpu"), torch.float32).implementation == "transformers"
    with caplog.at_level(logging.INFO, logger="toolkit"), serving(model_dir) as client:
        texts = [*TEXTS, text_at_limit(client)]
        batch = embed(client, texts)
        alone = embed(client, texts[:1])
    # /get_model_info does not say which implementation runs; the start-up log does.
    assert "falling back to transformers.AutoModel" in caplog.text
    assert "(transformers, padded)" in caplog.text
    assert_matches_references(batch, model_dir, texts)
    np.testing.assert_allclose(alone[0].numpy(), batch[0].numpy(), rtol=0, atol=1e-6)
