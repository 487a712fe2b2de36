"""The inference service: validate a request, tokenize it (off the event loop unless short), admit
it to the batch queue, await its embeddings.

The HTTP layer hands over inputs that its schema has already typed; the service checks their
content against the model (`toolkit.service.validation`), once, for every route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.errors import ContextLengthExceededError, InvalidRequestError
from toolkit.scheduling.timing import RequestTiming
from toolkit.scheduling.work import BatchQueue, WorkItem
from toolkit.service.model_spec import EmbeddingSpec
from toolkit.service.tokenization import TextTokenizer
from toolkit.service.validation import (
    check_count,
    check_dimensions,
    check_texts,
    check_token_ids,
    check_total_tokens,
    resolve_prompt,
)

logger = logging.getLogger(__name__)

FOREIGN_IDS_WARNING_EVERY_S = 60.0

# Texts this short are tokenized on the event loop: cheaper than the hop to a worker thread and
# back (docs/performance.md, "Tokenization").
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
class RequestLimits:
    context_length: int
    vocab_size: int
    max_inputs_per_request: int
    truncate: bool
    truncation_side: str
    default_prompt_name: str | None
    max_tokens_per_request: int | None = None


class InferenceService:
    """Validates and tokenizes requests, submits their inputs to a batch queue and awaits the
    results. The same object serves the single-process server, each front end (over a
    `RemoteBatcher`) and any in-process caller; it owns the queue's lifecycle."""

    def __init__(
        self,
        queue: BatchQueue,
        tokenizer: TextTokenizer,
        spec: EmbeddingSpec,
        limits: RequestLimits,
        embedding_dim: int,
    ) -> None:
        self.queue = queue
        self.tokenizer = tokenizer
        self.spec = spec
        self.limits = limits
        self.embedding_dim = embedding_dim
        self._foreign_ids_warned = -FOREIGN_IDS_WARNING_EVERY_S

    # --- lifecycle: on the event loop that will serve requests ---

    def start(self, on_batch: Callable[[int, int, float], None] | None = None) -> None:
        """Start taking work; `on_batch(inputs, tokens, seconds)` hears of every batch run."""
        self.queue.on_batch = on_batch
        self.queue.start()

    async def close(self) -> None:
        """Stop taking work, fail what is queued, release the device (or the engine link)."""
        await self.queue.close()

    @property
    def alive(self) -> bool:
        return self.queue.alive

    @property
    def queued_inputs(self) -> int:
        return self.queue.queued_inputs

    @property
    def queued_tokens(self) -> int:
        return self.queue.queued_tokens

    # --- requests ---

    async def embed(self, request: EmbedRequest, timing: RequestTiming | None = None) -> EmbedResult:
        """`timing`, when given, is stamped on admission and batching (see RequestTiming)."""
        check_dimensions(request.dimensions, self.embedding_dim, self.spec.matryoshka_dimensions)
        items = await self._work_items(request)
        check_total_tokens(items, self.limits.max_tokens_per_request, request.param)
        future = self.queue.submit(items, timing)
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
            limits, param = self.limits, request.param
            check_count(len(request.token_ids), limits.max_inputs_per_request, param)
            for index, ids in enumerate(request.token_ids):
                check_token_ids(ids, f"{param}[{index}]", param, limits.vocab_size, limits.context_length)
            self._notice_foreign_ids(request.token_ids)
            return [WorkItem(ids) for ids in request.token_ids]
        raise InvalidRequestError(f"'{request.param}' is required", param=request.param)

    def _notice_foreign_ids(self, token_ids: Sequence[Sequence[int]]) -> None:
        """Warn (at most once a minute) of token ids that lack the special tokens this model's
        tokenizer frames every input with: they were most likely made by another tokenizer, and
        their embedding means nothing. LangChain's OpenAIEmbeddings sends OpenAI's tiktoken ids
        unless check_embedding_ctx_length=False."""
        if all(self.tokenizer.frames(ids) for ids in token_ids):
            return
        now = time.monotonic()
        if now - self._foreign_ids_warned < FOREIGN_IDS_WARNING_EVERY_S:
            return
        self._foreign_ids_warned = now
        prefix, suffix = self.tokenizer.framing
        logger.warning(
            "Token ids without this model's framing (first %s, last %s) were embedded as given: "
            "if another tokenizer made them (LangChain's OpenAIEmbeddings does unless "
            "check_embedding_ctx_length=False), send text instead.",
            list(prefix),
            list(suffix),
        )

    async def _text_items(self, request: EmbedRequest, texts: Sequence[str]) -> list[WorkItem]:
        check_count(len(texts), self.limits.max_inputs_per_request, request.param)
        check_texts(texts, request.param)
        prompt = resolve_prompt(
            request.prompt, request.prompt_name, self.limits.default_prompt_name, self.spec
        )
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


def _truncate_dimensions(embeddings: np.ndarray, dimensions: int) -> np.ndarray:
    """Keep the first `dimensions` components and scale each row back to unit length."""
    head = embeddings[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return np.ascontiguousarray(head / np.maximum(norms, 1e-12), dtype=np.float32)
