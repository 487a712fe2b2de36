"""Sparse vectors on the request side: which route an input takes, the static query route of an
inference-free model (no forward pass: one weight per distinct token), and the top-k pruning and
(index, value) pairs clients read."""

from __future__ import annotations

import numpy as np

from toolkit.errors import InvalidRequestError, ModelLoadError
from toolkit.service.sparse_spec import ROUTES, SparseSpec
from toolkit.service.tokenization import TextTokenizer

# Cohere's input types name the same two routes.
_ROUTE_NAMES = {
    "query": "query",
    "search_query": "query",
    "document": "document",
    "search_document": "document",
}


class QueryRoute:
    """sentence-transformers' SparseStaticEmbedding: an input's vector holds the weight of each
    token it contains, once however often it occurs; tokens come without special tokens."""

    def __init__(self, spec: SparseSpec, vocab_size: int) -> None:
        from safetensors.numpy import load_file  # only for such a model; torch-free

        assert spec.query_dir is not None
        weights_file = spec.query_dir / "model.safetensors"
        if not weights_file.is_file():
            raise ModelLoadError(f"no model.safetensors in {spec.query_dir}")
        self.weights = load_file(str(weights_file)).get("weight")
        if self.weights is None or self.weights.shape != (vocab_size,):
            raise ModelLoadError(
                f"the SparseStaticEmbedding in {spec.query_dir} does not hold one weight for each of "
                f"the document model's {vocab_size} vocabulary entries"
            )
        self.tokenizer = TextTokenizer.from_dir(spec.query_dir, special_tokens=False)
        self.max_length = spec.query_max_length

    def vectors(self, token_ids: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(token_ids), self.weights.shape[0]), dtype=np.float32)
        for row, ids in zip(out, token_ids, strict=True):
            unique = np.unique(np.asarray(ids, dtype=np.int64))
            row[unique] = self.weights[unique]
        return out


def route_of(spec: SparseSpec, route: str | None, prompt_name: str | None) -> str:
    """The route an input takes: the one the request names (a route or Cohere's input type), else
    the one its prompt name names, else the model's default."""
    if route is not None:
        if route not in _ROUTE_NAMES:
            raise InvalidRequestError(
                f"unknown input_type {route!r}; known: {sorted(_ROUTE_NAMES)}", param="input_type"
            )
        return _ROUTE_NAMES[route]
    return prompt_name if prompt_name in ROUTES else spec.default_route


def keep_top(vectors: np.ndarray, k: int | None) -> np.ndarray:
    """Each row with only its `k` largest components by magnitude left non-zero, as
    sentence-transformers' `max_active_dims` keeps them."""
    if k is None or k >= vectors.shape[1]:
        return vectors
    if k < 1:
        raise InvalidRequestError("'max_active_dims' must be a positive integer", param="max_active_dims")
    top = np.argpartition(-np.abs(vectors), k - 1, axis=1)[:, :k]
    kept = np.zeros_like(vectors)
    np.put_along_axis(kept, top, np.take_along_axis(vectors, top, axis=1), axis=1)
    return kept


def pairs(vector: np.ndarray) -> list[dict[str, float]]:
    """A vector's non-zero components as TEI's [{"index", "value"}], by index."""
    indices = np.flatnonzero(vector)
    return [{"index": int(i), "value": float(v)} for i, v in zip(indices, vector[indices], strict=True)]
