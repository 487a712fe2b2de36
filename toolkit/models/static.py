"""sentence-transformers' StaticEmbedding (static-retrieval-mrl, model2vec): one learned vector per
token. The model only looks the vectors up; the runner's mean pooling over each input's packed
tokens is the average StaticEmbedding's EmbeddingBag takes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from toolkit.models.layers import uninitialized_embedding
from toolkit.models.packed_batch import PackedBatch

WEIGHTS = "model.safetensors"
TABLE = "embedding.weight"
# StaticEmbedding has no length limit of its own; one input may hold this many tokens.
MAX_INPUT_TOKENS = 32_768


def is_static_checkpoint(model_dir: Path) -> bool:
    """A folder holding only a StaticEmbedding table (no transformers config)."""
    if (model_dir / "config.json").is_file() or not (model_dir / WEIGHTS).is_file():
        return False
    with safe_open(model_dir / WEIGHTS, framework="pt") as weights:
        return set(weights.keys()) == {TABLE}


class StaticEmbedding(nn.Module):
    row_pooling_modes: frozenset[str] = frozenset()

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.tok_embeddings = uninitialized_embedding(vocab_size, dim)

    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.tok_embeddings(batch.input_ids.long())


def load_static(model_dir: Path) -> StaticEmbedding:
    with safe_open(model_dir / WEIGHTS, framework="pt") as weights:
        table = weights.get_tensor(TABLE)
    with torch.device("meta"):
        module = StaticEmbedding(*table.shape)
    module.load_state_dict({"tok_embeddings.weight": table}, strict=True, assign=True)
    return module
