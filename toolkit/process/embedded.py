"""`toolkit.Engine`: the server's inference service in the caller's own process, without HTTP.

The engine loads the model as the server does (`toolkit.execution.assembly.load_service`) and runs
the same `InferenceService` on an event loop of its own, in a background thread; `encode` hands it
requests from any thread (a notebook cell, a script), so results are the server's, computed the
same way. Long input lists are cut into requests of `chunk_size` inputs, a few in flight at once,
so that the batcher packs them like concurrent clients and memory stays that of a few chunks
(`stream` yields each chunk's vectors as they are done).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm  # a text bar: tqdm.auto warns in a notebook without ipywidgets

from toolkit.execution.assembly import load_service
from toolkit.execution.memory import tune_process_memory
from toolkit.process.gguf import prepare_gguf
from toolkit.server_args import ServerArgs
from toolkit.service.inference import EmbedRequest, InferenceService
from toolkit.service.similarity import Truncation, rank_documents, score_pairs

T = TypeVar("T")

CHUNK_SIZE = 256  # inputs per request the engine makes of a long list
CHUNKS_IN_FLIGHT = 4  # enough to keep the batcher full, few enough to bound memory

Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


class Engine:
    """Embed in-process: `Engine(model_path).encode(texts)`, the server's results without HTTP.

    `options` are the server's flags by their ServerArgs names (`max_batch_tokens=4096`,
    `cpu_workers=1`, `normalize=False`, ...). A context manager; `close()` frees the device.

    On a CPU the engine sets this process's malloc as the server sets its own (freed activations
    stay in the heap, which is given back once idle; `toolkit.execution.memory`): several per
    cent faster. `tune_memory=False` leaves the process's malloc alone.
    """

    def __init__(
        self,
        model_path: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        tune_memory: bool = True,
        **options: Any,
    ) -> None:
        options.setdefault("max_tokens_per_request", None)  # an HTTP limit, not one of a caller's
        self.args = ServerArgs.from_options(
            "Engine", model_path=model_path, device=device, dtype=dtype, **options
        )
        prepare_gguf(self.args.model_path)
        files = self.args.model_files()
        if tune_memory:
            tune_process_memory(self.args.device)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="toolkit-engine", daemon=True)
        self._thread.start()
        try:
            self.service: InferenceService = load_service(self.args, files)
            self._call(_started(self.service))
        except BaseException:
            _stop_loop(self._loop, self._thread)
            raise
        # An engine dropped unclosed (a notebook cell run again) or left open at exit closes
        # itself: else its thread keeps the model for good, and exit cuts its tasks off.
        self._close = weakref.finalize(self, _shut_down, self._loop, self._thread, self.service)

    # --- what the model gives ---

    @property
    def embedding_dim(self) -> int:
        return self.service.embedding_dim

    @property
    def max_length(self) -> int:
        """Tokens per input at most (longer inputs are refused, or cut with `truncate=True`)."""
        return self.service.limits.context_length

    # --- encoding ---

    def encode(
        self,
        inputs: Inputs,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        show_progress: bool = False,
        chunk_size: int = CHUNK_SIZE,
    ) -> np.ndarray:
        """Embeddings [N, D] of texts or token-id lists (of one text or id list: [D]), float32.

        `normalize=True` scales them to unit length whatever the model does; `False` is refused
        for a model whose own files normalize (load it with `Engine(..., normalize=False)`)."""
        single = isinstance(inputs, str) or bool(inputs and isinstance(inputs[0], int))
        batch: Iterable[Any] = [inputs] if single else inputs
        # A list longer than a chunk goes longest first, as sentence-transformers sorts: each chunk
        # then holds similar lengths, and its batches pad less (docs/performance.md).
        order = None
        if isinstance(batch, list) and len(batch) > chunk_size:
            order = np.argsort([-len(item) for item in batch], kind="stable")
            batch = [batch[i] for i in order]
        options = _Options(prompt_name, prompt, dimensions, truncate, normalize)
        parts = list(
            self.stream(batch, chunk_size=chunk_size, show_progress=show_progress, **options.asdict())
        )
        rows = np.concatenate(parts) if parts else np.empty((0, self.embedding_dim), np.float32)
        if order is not None:
            rows[order] = rows.copy()
        return rows[0] if single else rows

    def stream(
        self,
        inputs: Iterable[Any],
        *,
        chunk_size: int = CHUNK_SIZE,
        show_progress: bool = False,
        **options: Any,
    ) -> Iterator[np.ndarray]:
        """The embeddings of each chunk of `chunk_size` inputs, in order, as they are done:
        `inputs` is read lazily, and only a few chunks are held at a time."""
        if self._loop.is_closed():
            raise RuntimeError("this engine is closed")
        encode_options = _Options(**options)
        self._check_normalize(encode_options.normalize)
        progress = tqdm(desc="Embedding", unit="input", disable=not show_progress)
        pending: deque[Future[np.ndarray]] = deque()
        try:
            for chunk in _chunks(inputs, chunk_size):
                pending.append(self._submit(self._encode_chunk(chunk, encode_options)))
                if len(pending) >= CHUNKS_IN_FLIGHT:
                    yield self._finish(pending.popleft(), progress)
            while pending:
                yield self._finish(pending.popleft(), progress)
        finally:
            for future in pending:  # a caller that stops early (or an error) withdraws the rest
                future.cancel()
            progress.close()

    async def aencode(self, inputs: Inputs, **options: Any) -> np.ndarray:
        """`encode` for a caller on an event loop of its own (an async notebook cell)."""
        return await asyncio.to_thread(self.encode, inputs, **options)

    async def astream(self, inputs: Iterable[Any], **options: Any) -> AsyncIterator[np.ndarray]:
        """`stream` for a caller on an event loop of its own."""
        chunks = iter(self.stream(inputs, **options))
        while (part := await asyncio.to_thread(next, chunks, None)) is not None:
            yield part

    # --- ranking and scoring ---

    def rerank(
        self, query: str, documents: Sequence[str], *, top_n: int | None = None, truncate: bool | None = None
    ) -> list[dict[str, Any]]:
        """The documents best first, as `{"index", "relevance_score"}`: a cross-encoder's scores,
        or an embedding model's cosine similarity (the server's /v1/rerank)."""
        texts = [documents] if isinstance(documents, str) else list(documents)
        work = rank_documents(self.service, query, texts, Truncation(truncate))
        scores = self._call(work).scores
        order = np.argsort(-scores, kind="stable")[: top_n or len(scores)]
        return [{"index": int(i), "relevance_score": float(scores[i])} for i in order]

    def score(
        self, text_1: str | Sequence[str], text_2: str | Sequence[str], *, truncate: bool | None = None
    ) -> np.ndarray:
        """One score per pair [N]: `text_1` against each of `text_2`, or pairwise (/v1/score)."""
        first = text_1 if isinstance(text_1, str) else list(text_1)
        second = text_2 if isinstance(text_2, str) else list(text_2)
        return self._call(score_pairs(self.service, first, second, Truncation(truncate))).scores

    async def arerank(self, query: str, documents: Sequence[str], **options: Any) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.rerank, query, documents, **options)

    async def ascore(
        self, text_1: str | Sequence[str], text_2: str | Sequence[str], **options: Any
    ) -> np.ndarray:
        return await asyncio.to_thread(self.score, text_1, text_2, **options)

    # --- lifecycle ---

    def close(self) -> None:
        """Stop taking work, fail what is queued and release the device; harmless twice."""
        self._close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    # --- on the engine's loop ---

    async def _encode_chunk(self, chunk: list[Any], options: _Options) -> np.ndarray:
        request = EmbedRequest(
            inputs=chunk,
            dimensions=options.dimensions,
            prompt=options.prompt,
            prompt_name=options.prompt_name,
            truncate=options.truncate,
        )
        rows = (await self.service.embed(request)).embeddings
        if options.normalize:
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return rows.astype(np.float32, copy=False)

    def _check_normalize(self, normalize: bool | None) -> None:
        if normalize is False and self.service.spec.normalize:
            raise ValueError(
                "this model's own files normalize its embeddings; load it with "
                "Engine(..., normalize=False) for unnormalized ones"
            )

    def _submit(self, work: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return self._submit(work).result()

    @staticmethod
    def _finish(future: Future[np.ndarray], progress: tqdm[Any]) -> np.ndarray:
        rows = future.result()
        progress.update(len(rows))
        return rows


@dataclasses.dataclass(frozen=True)
class _Options:
    prompt_name: str | None = None
    prompt: str | None = None
    dimensions: int | None = None
    truncate: bool | None = None
    normalize: bool | None = None

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def _started(service: InferenceService) -> None:
    service.start()


def _shut_down(loop: asyncio.AbstractEventLoop, thread: threading.Thread, service: InferenceService) -> None:
    if threading.current_thread() is thread:  # dropped by code on its own loop: close, not wait
        closing = loop.create_task(service.close())
        closing.add_done_callback(lambda _: loop.stop())
        return
    if loop.is_running():
        asyncio.run_coroutine_threadsafe(service.close(), loop).result()
    _stop_loop(loop, thread)


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def _chunks(inputs: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(inputs)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
