"""Compact forms of embeddings, as the Cohere, Voyage and Jina APIs return them.

`binary` and `ubinary` are sentence-transformers' `quantize_embeddings`: one bit per component
(set where it is positive), packed eight to a byte, first component in the highest bit; `binary`
shifts each byte by -128 into an int8. `int8` scales each vector on its own, its largest magnitude
to 127, and rounds: an input's bytes are the same alone or in any batch (sentence-transformers
calibrates its ranges over the batch, so its bytes depend on the neighbours). `uint8` is `int8`
shifted by +128. Cosine similarity survives the per-vector scale; magnitudes across vectors do not.
Shorter vectors (Matryoshka's `dimensions`) keep the first components, rescaled to unit length.
"""

from __future__ import annotations

import numpy as np


def compact(embeddings: np.ndarray, kind: str) -> np.ndarray:
    """`embeddings` [N, D] float32 in the form `kind` names (float, int8, uint8, binary or ubinary)."""
    if kind == "float":
        return embeddings
    if kind in ("binary", "ubinary"):
        bits = np.packbits(embeddings > 0, axis=-1)
        return bits if kind == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
    largest = np.abs(embeddings).max(axis=1, keepdims=True)
    scaled = np.rint(embeddings * (127 / np.maximum(largest, np.finfo(np.float32).tiny)))
    signed = scaled.astype(np.int8)
    return signed if kind == "int8" else (signed.astype(np.int16) + 128).astype(np.uint8)


def truncate_dimensions(embeddings: np.ndarray, dimensions: int) -> np.ndarray:
    """Keep the first `dimensions` components and scale each row back to unit length."""
    head = embeddings[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return np.ascontiguousarray(head / np.maximum(norms, 1e-12), dtype=np.float32)
