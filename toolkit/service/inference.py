"""The inference service: validate a request, tokenize it (off the event loop unless short), admit
it to the batch queue, await its embeddings.

The HTTP layer hands over the request's raw inputs; the service sorts and checks them against
the model (`toolkit.service.validation`), cheap checks first, once, for every route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.errors import ContextLengthExceededError, InvalidRequestError, RequestTimeoutError
from toolkit.scheduling.timing import RequestTiming
from toolkit.scheduling.work import BatchQueue, WorkItem
from toolkit.service.compact import truncate_dimensions
from toolkit.service.model_spec import EmbeddingSpec
from toolkit.service.pair_prompts import PairPrompter
from toolkit.service.sparse import QueryRoute, keep_top, route_of
from toolkit.service.tokenization import TextTokenizer
from toolkit.service.validation import (
    RequestLimits,
    check_dimensions,
    check_total_tokens,
    check_vocabulary,
    resolve_prompt,
    sort_inputs,
    text_list,
)

logger = logging.getLogger(__name__)

FOREIGN_IDS_WARNING_EVERY_S = 60.0

# Texts this short are tokenized on the event loop: cheaper than the hop to a worker thread and
# back (docs/performance.md, "Tokenization").
INLINE_TOKENIZE_CHARS = 256


# A text may hold this many characters per token of the context before it is refused (or cut,
# with truncation) untokenized: a bound on the tokenizer's work that no real text reaches.
CHARS_PER_TOKEN_BOUND = 4


@dataclass(frozen=True)
class EmbedRequest:
    """`inputs`: a text, texts, one token-id list or token-id lists, as a client sent them;
    `param` names the field for error messages."""

    inputs: object
    param: str = "input"
    accepts: str = "texts or token ids"  # or "texts", or "token ids" (SGLang's /encode fields)
    dimensions: int | None = None
    dimensions_param: str = "dimensions"
    prompt: str | None = None
    prompt_name: str | None = None
    truncate: bool | None = None
    truncation_side: str | None = None
    # Sparse models: the route ("query", "document", or Cohere's input types; None: by the
    # prompt name, else the model's default) and how many components to keep.
    route: str | None = None
    max_active_dims: int | None = None


@dataclass(frozen=True)
class PairsRequest:
    """Text pairs for a cross-encoder: `firsts[i]` with `seconds[i]` (one first: with each);
    `first_param` and `param` name their fields for error messages."""

    firsts: list[str]
    seconds: list[str]
    param: str = "documents"
    truncate: bool | None = None
    first_param: str = "query"
    instruction: str | None = None  # a decoder reranker's task, where its prompt takes one


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # [N, D] float32
    token_counts: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)


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
        sparse = spec.sparse
        self.query_route = QueryRoute(sparse, embedding_dim) if sparse and sparse.query_dir else None
        self.prompter = PairPrompter(spec.prompted, tokenizer) if spec.prompted else None
        self.max_text_chars = limits.context_length * tokenizer.max_token_chars * CHARS_PER_TOKEN_BOUND

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
    def stalled(self) -> bool:
        return self.queue.stalled

    @property
    def engines_alive(self) -> int:
        return self.queue.engines_alive

    @property
    def queued_inputs(self) -> int:
        return self.queue.queued_inputs

    @property
    def queued_tokens(self) -> int:
        return self.queue.queued_tokens

    # --- requests ---

    async def embed(self, request: EmbedRequest, timing: RequestTiming | None = None) -> EmbedResult:
        """`timing`, when given, is stamped on admission and batching (see RequestTiming)."""
        if self.spec.is_cross_encoder:
            raise InvalidRequestError(
                "this model is a cross-encoder: it scores text pairs on /v1/rerank and /v1/score "
                "and has no embeddings",
                param=request.param,
            )
        if self.spec.sparse is not None:
            return await self._embed_sparse(request, timing)
        if request.max_active_dims is not None:
            raise InvalidRequestError(
                "'max_active_dims' applies to sparse models; this one gives dense vectors",
                param="max_active_dims",
            )
        check_dimensions(
            request.dimensions, self.embedding_dim, self.spec.matryoshka_dimensions, request.dimensions_param
        )
        items, rows = await self._run(self._work_items(request), request.param, timing)
        embeddings = np.stack(rows).astype(np.float32, copy=False)
        if request.dimensions is not None and request.dimensions < embeddings.shape[1]:
            embeddings = truncate_dimensions(embeddings, request.dimensions)
        return EmbedResult(embeddings, [len(item.token_ids) for item in items])

    async def _embed_sparse(self, request: EmbedRequest, timing: RequestTiming | None) -> EmbedResult:
        """A sparse model's vocabulary-wide vectors: SPLADE, or an inference-free model's query
        route, computed here without the device."""
        sparse = self.spec.sparse
        assert sparse is not None
        if request.dimensions is not None:
            raise InvalidRequestError(
                "a sparse model's vectors span its vocabulary and cannot be shortened; "
                "send 'max_active_dims' to keep the largest components",
                param=request.dimensions_param,
            )
        name = request.prompt_name or (
            None if request.prompt is not None else self.limits.default_prompt_name
        )
        route = self.query_route if route_of(sparse, request.route, name) == "query" else None
        if route is None:
            items, rows = await self._run(self._work_items(request), request.param, timing)
            vectors = await asyncio.to_thread(np.stack, rows)
        else:
            items, _ = await self._run(
                self._work_items(request, route.tokenizer), request.param, None, run=False
            )
            vectors = await asyncio.to_thread(route.vectors, [item.token_ids for item in items])
        top = request.max_active_dims or sparse.max_active_dims
        if top is not None:  # work as large as the vocabulary times the inputs: beside the loop
            vectors = await asyncio.to_thread(keep_top, vectors, top)
        return EmbedResult(vectors, [len(item.token_ids) for item in items])

    async def classify(self, request: PairsRequest, timing: RequestTiming | None = None) -> EmbedResult:
        """A cross-encoder's score of each pair: its logits through the model's activation (the
        spec admits single-label cross-encoders only)."""
        items, rows = await self._run(self._pair_items(request), request.param, timing)
        scores = activated(np.stack(rows).astype(np.float32, copy=False), self.spec.activation)
        return EmbedResult(scores, [len(item.token_ids) for item in items])

    async def _pair_items(self, request: PairsRequest) -> list[WorkItem]:
        truncate = self.limits.truncate if request.truncate is None else request.truncate
        side = "right" if truncate else None
        firsts, seconds = (
            sort_inputs(texts, param, self.limits, self.max_text_chars, side).texts or []
            for param, texts in ((request.first_param, request.firsts), (request.param, request.seconds))
        )
        pairs = list(zip(firsts * len(seconds) if len(firsts) == 1 else firsts, seconds, strict=True))
        limit = self.limits.context_length
        prompter = self.prompter  # an instruction without one is refused by the callers (similarity)

        def encode() -> list[tuple[list[int], int]]:
            if prompter is not None:
                return [
                    (ids, 0) for ids in prompter.encode(pairs, limit, bool(truncate), request.instruction)
                ]
            return self.tokenizer.encode_pairs(pairs, limit if truncate else None)

        chars = sum(len(a) + len(b) for a, b in pairs) + len(request.instruction or "") * len(pairs)
        encoded = encode() if chars <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(encode)
        first = next((i for i, (ids, _) in enumerate(encoded) if len(ids) > limit), None)
        if first is not None:
            raise ContextLengthExceededError(
                f"{request.first_param} and {request.param}[{first}] make a pair of "
                f"{len(encoded[first][0])} tokens, more than this model's context length of {limit}; "
                'shorten them or send "truncate": true',
                param=request.param,
            )
        skips = self.spec.score_skips
        if skips is not None:  # causal: the tokens after the one read change nothing, so drop them
            encoded = [(_strip_trailing(ids, skips), segment) for ids, segment in encoded]
        return [WorkItem(ids, 0, segment) for ids, segment in encoded]

    async def tokenize(self, raw: object, add_special_tokens: bool | None = None) -> list[list[int]]:
        """Token ids of a text or texts, whatever their length: counting them is the point."""
        texts = text_list(raw, "prompt", self.limits.max_inputs_per_request)

        def encode() -> list[list[int]]:
            return self.tokenizer.encode(texts, add_special_tokens)

        return encode() if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(encode)

    async def detokenize(self, raw: object, skip_special_tokens: bool = False) -> str:
        """The text of one list of token ids of this model's vocabulary."""
        if not isinstance(raw, list) or (raw and isinstance(raw[0], list | str)):
            raise InvalidRequestError("'tokens' must be one list of token ids", param="tokens")
        inputs = sort_inputs(raw, "tokens", self.limits, self.max_text_chars, None)
        assert inputs.token_ids is not None
        ids = inputs.token_ids[0]
        check_vocabulary(ids, "tokens", "tokens", self.limits.vocab_size)
        if len(ids) <= INLINE_TOKENIZE_CHARS:
            return self.tokenizer.decode(ids, skip_special_tokens)
        return await asyncio.to_thread(self.tokenizer.decode, ids, skip_special_tokens)

    async def _run(
        self,
        prepared: Awaitable[list[WorkItem]],
        param: str,
        timing: RequestTiming | None,
        run: bool = True,
    ) -> tuple[list[WorkItem], list[np.ndarray]]:
        """Prepare a request's work items, check its token total and run them (unless not to
        `run`), all within the request timeout."""
        timeout = self.limits.request_timeout
        try:
            async with asyncio.timeout(timeout):
                items = await prepared
                check_total_tokens(items, self.limits.max_tokens_per_request, param)
                return items, await self._rows(items, timing) if run else []
        except TimeoutError:
            raise RequestTimeoutError(
                f"no answer within the server's request timeout of {timeout:g} s; the work was withdrawn"
            ) from None

    async def _rows(self, items: list[WorkItem], timing: RequestTiming | None) -> list[np.ndarray]:
        future = self.queue.submit(items, timing)
        try:
            return await future
        finally:
            future.cancel()  # a cancelled request (client gone, timed out) leaves its inputs unrun

    async def _work_items(
        self, request: EmbedRequest, tokenizer: TextTokenizer | None = None
    ) -> list[WorkItem]:
        side = self._truncation_side(request)
        inputs = sort_inputs(request.inputs, request.param, self.limits, self.max_text_chars, side)
        kind = "texts" if inputs.texts is not None else "token ids"
        if kind not in request.accepts:
            raise InvalidRequestError(f"'{request.param}' must hold {request.accepts}", param=request.param)
        if inputs.texts is not None:
            return await self._text_items(request, inputs.texts, tokenizer or self.tokenizer)
        assert inputs.token_ids is not None
        if request.prompt is not None or request.prompt_name is not None:
            raise InvalidRequestError(
                "prompts apply to text inputs only; token ids are embedded as given", param="prompt"
            )
        for index, ids in enumerate(inputs.token_ids):
            check_vocabulary(ids, f"{request.param}[{index}]", request.param, self.limits.vocab_size)
        self._notice_foreign_ids(inputs.token_ids)
        return [WorkItem(ids) for ids in inputs.token_ids]

    def _truncation_side(self, request: EmbedRequest) -> str | None:
        """Which end truncation cuts, or None where the request's inputs must fit whole."""
        truncate = self.limits.truncate if request.truncate is None else request.truncate
        return (request.truncation_side or self.limits.truncation_side) if truncate else None

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

    async def _text_items(
        self, request: EmbedRequest, texts: Sequence[str], tokenizer: TextTokenizer
    ) -> list[WorkItem]:
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
        ids = await self._tokenize(list(texts), self._truncation_side(request), request.param, tokenizer)
        pool_start = 0
        if prompt and not self.spec.include_prompt:
            pool_start = self.tokenizer.prompt_length(prompt)
        return [WorkItem(seq, pool_start) for seq in ids]

    async def _tokenize(
        self, texts: list[str], side: str | None, param: str, tokenizer: TextTokenizer
    ) -> list[list[int]]:
        """Token ids of each text: cut at the context length from `side`, or, with no side, whole
        and refused when one is longer. Tokenized once, beside the event loop unless short."""
        limit = self.limits.context_length
        if self.query_route is not None and tokenizer is self.query_route.tokenizer:
            limit = min(limit, self.query_route.max_length or limit)

        def encode() -> list[list[int]]:
            if side is None:
                return tokenizer.encode(texts)
            return tokenizer.encode_truncated(texts, limit, side)

        # Rust tokenization releases the GIL: long texts run beside the event loop, not on it.
        ids = encode() if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(encode)
        empty = next((i for i, seq in enumerate(ids) if not seq), None)
        if empty is not None:  # a model without special tokens, a text of none of its tokens
            raise InvalidRequestError(f"{param}[{empty}] holds no token this model embeds", param=param)
        first = next((i for i, seq in enumerate(ids) if len(seq) > limit), None)
        if first is not None:
            raise ContextLengthExceededError(
                f"{param}[{first}] has {len(ids[first])} tokens, more than this model's context length "
                f'of {limit}; shorten it or send "truncate": true',
                param=param,
            )
        return ids


def _strip_trailing(ids: list[int], token: int) -> list[int]:
    end = len(ids)
    while end > 1 and ids[end - 1] == token:
        end -= 1
    return ids[:end]


def activated(logits: np.ndarray, activation: str) -> np.ndarray:
    """A cross-encoder's scores from its logits [N, labels]: one column per label, or the only
    label's column as [N]."""
    scores = 1 / (1 + np.exp(-logits)) if activation == "sigmoid" else logits
    return np.ascontiguousarray(scores[:, 0] if scores.shape[1] == 1 else scores, dtype=np.float32)
