"""The engine: validate a request, tokenize it (off the event loop unless short), admit it, await
its embeddings.

All request validation lives here, once, for every route. The HTTP layer hands over inputs that
its schema has already typed; the engine checks their content against the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from toolkit.errors import ContextLengthExceededError, InvalidRequestError
from toolkit.model_spec import EmbeddingSpec
from toolkit.tokenization import TextTokenizer
from toolkit.work import BatchQueue, WorkItem

if TYPE_CHECKING:
    from toolkit.metrics import RequestTiming


# Texts this short are tokenized on the event loop: that takes about 12 us for a 4-word query,
# where the hop to a worker thread and back took 160 us (0.4 ms on an idle 2-core server).
INLINE_TOKENIZE_CHARS = 256


@dataclass(frozen=True)
class EmbedRequest:
    """Inputs are all texts or all token-id lists; `param` names the field for error messages."""

    texts: Sequence[str] | None = None
    token_ids: Sequence[Sequence[int]] | None = None
    param: str = "input"
    dimensions: int | None = None
    prompt: str | None = None
    prompt_name: str | None = None
    truncate: bool | None = None
    truncation_side: str | None = None


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # [N, D] float32
    token_counts: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(frozen=True)
class EngineLimits:
    context_length: int
    vocab_size: int
    max_inputs_per_request: int
    truncate: bool
    truncation_side: str
    default_prompt_name: str | None
    max_tokens_per_request: int | None = None


class Engine:
    def __init__(
        self,
        batcher: BatchQueue,
        tokenizer: TextTokenizer,
        spec: EmbeddingSpec,
        limits: EngineLimits,
        embedding_dim: int,
    ) -> None:
        self.batcher = batcher
        self.tokenizer = tokenizer
        self.spec = spec
        self.limits = limits
        self.embedding_dim = embedding_dim

    async def embed(self, request: EmbedRequest, timing: RequestTiming | None = None) -> EmbedResult:
        """`timing`, when given, is stamped on admission and batching (see toolkit.metrics)."""
        self._check_dimensions(request.dimensions)
        items = await self._work_items(request)
        self._check_total_tokens(items, request.param)
        future = self.batcher.submit(items, timing)
        try:
            rows = await future
        finally:
            future.cancel()  # a cancelled request (client gone) leaves its queued inputs to be skipped
        embeddings = np.stack(rows).astype(np.float32, copy=False)
        if request.dimensions is not None and request.dimensions < embeddings.shape[1]:
            embeddings = _truncate_dimensions(embeddings, request.dimensions)
        return EmbedResult(embeddings, [len(item.token_ids) for item in items])

    async def _work_items(self, request: EmbedRequest) -> list[WorkItem]:
        if request.texts is not None:
            return await self._text_items(request, request.texts)
        if request.token_ids is not None:
            if request.prompt is not None or request.prompt_name is not None:
                raise InvalidRequestError(
                    "prompts apply to text inputs only; token ids are embedded as given",
                    param="prompt",
                )
            self._check_count(len(request.token_ids), request.param)
            for index, ids in enumerate(request.token_ids):
                self._check_token_ids(ids, f"{request.param}[{index}]", request.param)
            return [WorkItem(ids) for ids in request.token_ids]
        raise InvalidRequestError(f"'{request.param}' is required", param=request.param)

    async def _text_items(self, request: EmbedRequest, texts: Sequence[str]) -> list[WorkItem]:
        self._check_count(len(texts), request.param)
        for index, text in enumerate(texts):
            if not text:
                raise InvalidRequestError(
                    f"{request.param}[{index}] is an empty string; every input must hold text",
                    param=request.param,
                )
        prompt = self._resolve_prompt(request)
        if self.spec.do_lower_case:
            # sentence-transformers lowercases in the tokenizer's normalizer, so the prompt too
            # (and the prompt length it pools past is counted on the lowercased prompt).
            texts = [text.lower() for text in texts]
            prompt = prompt.lower() if prompt else prompt
        if prompt:
            texts = [prompt + text for text in texts]
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            ids = self.tokenizer.encode(list(texts))
        else:  # Rust tokenization releases the GIL: run it beside the event loop, not on it
            ids = await asyncio.to_thread(self.tokenizer.encode, list(texts))
        ids = await self._fit_context(request, texts, ids)
        pool_start = 0
        if prompt and not self.spec.include_prompt:
            pool_start = self.tokenizer.prompt_length(prompt)
        return [WorkItem(seq, pool_start) for seq in ids]

    async def _fit_context(
        self, request: EmbedRequest, texts: Sequence[str], ids: list[list[int]]
    ) -> list[list[int]]:
        limit = self.limits.context_length
        too_long = [i for i, seq in enumerate(ids) if len(seq) > limit]
        if not too_long:
            return ids
        truncate = self.limits.truncate if request.truncate is None else request.truncate
        if not truncate:
            first = too_long[0]
            raise ContextLengthExceededError(
                f"{request.param}[{first}] has {len(ids[first])} tokens, more than this model's "
                f'context length of {limit}; shorten it or send "truncate": true',
                param=request.param,
            )
        side = request.truncation_side or self.limits.truncation_side
        cut = await asyncio.to_thread(
            self.tokenizer.encode_truncated, [texts[i] for i in too_long], limit, side
        )
        for index, seq in zip(too_long, cut, strict=True):
            ids[index] = seq
        return ids

    def _resolve_prompt(self, request: EmbedRequest) -> str | None:
        if request.prompt is not None and request.prompt_name is not None:
            raise InvalidRequestError("send either 'prompt' or 'prompt_name', not both", param="prompt")
        if request.prompt is not None:
            return request.prompt
        name = request.prompt_name or self.limits.default_prompt_name
        if name is None:
            return None
        if name not in self.spec.prompts:
            known = ", ".join(sorted(self.spec.prompts)) or "none"
            raise InvalidRequestError(
                f"unknown prompt_name {name!r}; this model's prompts: {known}", param="prompt_name"
            )
        return self.spec.prompts[name]

    def _check_count(self, count: int, param: str) -> None:
        if count == 0:
            raise InvalidRequestError(f"'{param}' must not be empty", param=param)
        if count > self.limits.max_inputs_per_request:
            raise InvalidRequestError(
                f"'{param}' holds {count} inputs; at most {self.limits.max_inputs_per_request} "
                "are allowed per request",
                param=param,
            )

    def _check_total_tokens(self, items: Sequence[WorkItem], param: str) -> None:
        limit = self.limits.max_tokens_per_request
        total = sum(len(item.token_ids) for item in items)
        if limit is not None and total > limit:
            raise InvalidRequestError(
                f"'{param}' holds {total} tokens in all; at most {limit} are allowed per request",
                param=param,
                code="max_tokens_per_request_exceeded",
            )

    def _check_token_ids(self, ids: Sequence[int], where: str, param: str) -> None:
        if not ids:
            raise InvalidRequestError(f"{where} is an empty list of token ids", param=param)
        vocab = self.limits.vocab_size
        # min/max run in C; only a failing list is scanned again, for the message.
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise InvalidRequestError(
                f"{where} holds token id {bad}, outside this model's vocabulary 0..{vocab - 1}",
                param=param,
            )
        if len(ids) > self.limits.context_length:
            raise ContextLengthExceededError(
                f"{where} has {len(ids)} tokens, more than this model's context length of "
                f"{self.limits.context_length}",
                param=param,
            )

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        allowed = self.spec.matryoshka_dimensions
        if allowed is not None and dimensions not in allowed and dimensions != self.embedding_dim:
            raise InvalidRequestError(
                f"dimensions must be one of this model's Matryoshka sizes {list(allowed)}",
                param="dimensions",
            )
        if not 1 <= dimensions <= self.embedding_dim:
            raise InvalidRequestError(
                f"dimensions must be between 1 and {self.embedding_dim}, got {dimensions}",
                param="dimensions",
            )


def _truncate_dimensions(embeddings: np.ndarray, dimensions: int) -> np.ndarray:
    """Keep the first `dimensions` components and scale each row back to unit length."""
    head = embeddings[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return np.ascontiguousarray(head / np.maximum(norms, 1e-12), dtype=np.float32)
