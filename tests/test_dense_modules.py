"""sentence-transformers Dense and LayerNorm modules after pooling (EmbeddingGemma, stella, LaBSE
carry Dense ones):
served over HTTP and compared with SentenceTransformer.encode on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.model_zoo import assert_embeddings_close, build_tiny_model
from tests.helpers.servers import start_test_client

TEXTS = ["hello", "The quick brown fox jumps over the lazy dog.", "Le café 東京 🙂 " * 3]


def with_dense(family: str, dest: Path) -> Path:
    """A tiny model with two Dense modules (tanh with bias, identity without) around a LayerNorm,
    before Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, LayerNorm

    model = SentenceTransformer(str(build_tiny_model(family, dest / "base")), device="cpu")
    torch.manual_seed(1)
    dim = model.get_embedding_dimension()
    *body, normalize = list(model)
    first = Dense(dim, 24, activation_function=torch.nn.Tanh())
    second = Dense(24, 16, bias=False, activation_function=torch.nn.Identity())
    norm = LayerNorm(24)
    with torch.no_grad():  # not the identity it starts as
        norm.norm.weight.uniform_(0.5, 1.5)
        norm.norm.bias.uniform_(-0.2, 0.2)
    modules = [*body, first, norm, second, normalize]
    SentenceTransformer(modules=modules, device="cpu").save(str(dest / "dense"))
    return dest / "dense"


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_dense_modules_are_applied_as_sentence_transformers_applies_them(family: str, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model_dir = with_dense(family, tmp_path)
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, convert_to_tensor=True).cpu()
    client = start_test_client(["--model-path", str(model_dir)])
    try:
        info = client.get("/get_model_info").json()
        answer = client.post("/v1/embeddings", json={"input": TEXTS})
        alone = client.post("/v1/embeddings", json={"input": TEXTS[1]})
    finally:
        client.__exit__(None, None, None)
    assert info["embedding_dim"] == 16
    assert [m["module"] for m in info["after_pooling"]] == ["Dense", "LayerNorm", "Dense"]
    assert [m.get("activation") for m in info["after_pooling"]] == ["Tanh", None, "Identity"]
    served = np.array([item["embedding"] for item in answer.json()["data"]], dtype=np.float32)
    assert_embeddings_close(torch.from_numpy(served), expected)
    single = np.array(alone.json()["data"][0]["embedding"], dtype=np.float32)
    assert np.abs(single - served[1]).max() <= 1e-6


def test_an_unknown_dense_activation_is_refused_at_start_with_its_name(tmp_path: Path) -> None:
    from toolkit.errors import ModelLoadError
    from toolkit.service.model_spec import read_embedding_spec

    model_dir = with_dense("bert", tmp_path)
    config = model_dir / "2_Dense" / "config.json"
    config.write_text(config.read_text().replace("activation.Tanh", "activation.Softsign"))
    with pytest.raises(ModelLoadError, match="Softsign"):
        read_embedding_spec(model_dir)
