"""Scores of text pairs and rankings of documents: a cross-encoder's score of each pair, or on an
embedding model the cosine similarity of their embeddings (a sparse model's dot product), as vLLM
serves a bi-encoder's /score and /rerank (one server can then retrieve and rerank).

A query takes the model's `query` prompt and a document its `document` (or `passage`) prompt
where the model's sentence-transformers config names one, as its model card asks of users.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.errors import InvalidRequestError
from toolkit.scheduling.timing import RequestTiming
from toolkit.service.inference import EmbedRequest, EmbedResult, InferenceService, PairsRequest
from toolkit.service.validation import text_list

QUERY_PROMPTS = ("query",)
DOCUMENT_PROMPTS = ("document", "passage")


@dataclass(frozen=True)
class Scores:
    scores: np.ndarray  # [N] float32, one per pair or document, in the request's order
    token_counts: list[int]
    documents: list[str] = field(default_factory=list)  # a ranking's documents, as texts

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(frozen=True)
class Truncation:
    """How pairs are cut, and a decoder reranker's instruction (the request's pair options)."""

    truncate: bool | None = None
    side: str | None = None
    instruction: str | None = None


async def rank_documents(
    service: InferenceService,
    query: str,
    documents: object,
    truncation: Truncation,
    timing: RequestTiming | None = None,
) -> Scores:
    """Each document's score against the query; the documents as texts."""
    texts = text_list(documents, "documents", service.limits.max_inputs_per_request, objects=True)
    _check_instruction(service, truncation)
    if service.spec.is_cross_encoder:
        pairs = PairsRequest(
            [query], texts, "documents", truncation.truncate, instruction=truncation.instruction
        )
        result = await service.classify(pairs, timing)
        return Scores(result.embeddings, result.token_counts, texts)
    queries, docs = await _both(
        service.embed(_request([query], "query", QUERY_PROMPTS, service, truncation, "query"), timing),
        service.embed(
            _request(texts, "documents", DOCUMENT_PROMPTS, service, truncation, "document"), timing
        ),
    )
    return Scores(_similarity(service, queries, docs), _counts(queries, docs), texts)


async def score_pairs(
    service: InferenceService,
    text_1: object,
    text_2: object,
    truncation: Truncation,
    timing: RequestTiming | None = None,
) -> Scores:
    """One score per pair: `text_1` against each of `text_2` when it is one text (or a list of
    one), else pairwise, `text_1[i]` against `text_2[i]`."""
    limit = service.limits.max_inputs_per_request
    firsts, seconds = text_list(text_1, "text_1", limit), text_list(text_2, "text_2", limit)
    if len(firsts) not in (1, len(seconds)):
        raise InvalidRequestError(
            f"'text_1' holds {len(firsts)} texts and 'text_2' {len(seconds)}: send one text_1, or as "
            "many as text_2",
            param="text_1",
        )
    _check_instruction(service, truncation)
    if service.spec.is_cross_encoder:
        pairs = PairsRequest(firsts, seconds, "text_2", truncation.truncate, "text_1", truncation.instruction)
        result = await service.classify(pairs, timing)
        return Scores(result.embeddings, result.token_counts)
    left, right = await _both(
        service.embed(_request(firsts, "text_1", (), service, truncation), timing),
        service.embed(_request(seconds, "text_2", (), service, truncation), timing),
    )
    return Scores(_similarity(service, left, right), _counts(left, right))


def _check_instruction(service: InferenceService, truncation: Truncation) -> None:
    if truncation.instruction is not None and service.spec.prompted is None:
        raise InvalidRequestError(
            "only a decoder reranker's prompt takes an instruction", param="instruction"
        )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of `a` [1 or N, D] against `b` [N, D]."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.asarray((a * b).sum(axis=1), dtype=np.float32)


def _similarity(service: InferenceService, first: EmbedResult, second: EmbedResult) -> np.ndarray:
    """Cosine similarity; a sparse model's dot product, its sentence-transformers similarity."""
    if service.spec.sparse is not None:
        return np.asarray((first.embeddings * second.embeddings).sum(axis=1), dtype=np.float32)
    return cosine(first.embeddings, second.embeddings)


def _request(
    texts: list[str],
    param: str,
    prompts: tuple[str, ...],
    service: InferenceService,
    truncation: Truncation,
    route: str | None = None,
) -> EmbedRequest:
    named = next((name for name in prompts if name in service.spec.prompts), None)
    return EmbedRequest(
        inputs=texts,
        param=param,
        accepts="texts",
        prompt_name=named,
        # Without a prompt of its own, the server's default prompt must not apply either.
        prompt=None if named else "",
        truncate=truncation.truncate,
        truncation_side=truncation.side,
        route=route,
    )


async def _both(
    first: Coroutine[Any, Any, EmbedResult], second: Coroutine[Any, Any, EmbedResult]
) -> tuple[EmbedResult, EmbedResult]:
    """Both embeddings, batched together; when one side fails, the other is withdrawn."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        left, right = await asyncio.gather(*tasks)
        return left, right
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _counts(first: EmbedResult, second: EmbedResult) -> list[int]:
    return [*first.token_counts, *second.token_counts]
