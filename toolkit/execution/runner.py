"""The Runner: turns batches of work items into embeddings on the device threads.

It packs a batch, runs the model's forward (or a CUDA graph's replay), pooling and normalization,
and hands the rows back. A batch that fails with out-of-memory is split in halves and retried,
down to single inputs; any other failure is returned as that batch's error. A device thread never
dies of a batch; if it dies anyway, `alive` turns False and the batcher fails new work fast
instead of queueing it forever.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from toolkit.errors import ServiceUnavailableError
from toolkit.execution.cpu_policy import WorkSplit
from toolkit.execution.device_threads import DeviceThreads
from toolkit.execution.packing import pack
from toolkit.execution.pooling import normalize, pool, token_rows
from toolkit.execution.row_buckets import filler_lengths
from toolkit.models.base import LoadedModel
from toolkit.models.packed_batch import PackedBatch
from toolkit.scheduling.work import ItemResult, WorkItem

if TYPE_CHECKING:
    import numpy as np

    from toolkit.execution.cuda_graphs import BatchGraphs

logger = logging.getLogger(__name__)


@dataclass
class RunnerStats:
    """Where serving time goes, for the shutdown summary and benchmarks."""

    batches: int = 0
    tokens: int = 0
    launch_s: float = 0.0  # device-thread time: packing, copies, launching kernels
    device_s: float = 0.0  # GPU time between a batch's first and last kernel (CUDA only)
    first_launch: float | None = None
    last_done: float = 0.0
    # A CPU's device threads record batches side by side.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def launched(self, began: float, tokens: int) -> None:
        """A batch of `tokens` tokens, started at `began`, is launched (on a CPU: computed)."""
        with self._lock:
            if self.first_launch is None:
                self.first_launch = began
            self.batches += 1
            self.tokens += tokens
            self.launch_s += time.perf_counter() - began

    def finished(self, device_seconds: float) -> None:
        with self._lock:
            self.device_s += device_seconds
            self.last_done = time.perf_counter()

    def summary(self) -> str:
        wall = self.last_done - self.first_launch if self.first_launch is not None else 0.0
        busy = f", device busy {self.device_s / wall:.0%} of {wall:.1f} s" if self.device_s and wall else ""
        return f"Served {self.batches} batches, {self.tokens} tokens; launch {self.launch_s:.2f} s{busy}"


@dataclass
class _Launched:
    """A batch whose kernels are queued; its embeddings land in `host` once `done` fires."""

    host: torch.Tensor  # [B, D] float32 on the CPU (pinned when copied from a GPU)
    order: list[int]  # row i of `host` belongs to item order[i]
    started: torch.cuda.Event | None
    done: torch.cuda.Event | None

    def results(self, stats: RunnerStats) -> list[ItemResult]:
        device_seconds = 0.0
        if self.done is not None and self.started is not None:
            self.done.synchronize()
            device_seconds = self.started.elapsed_time(self.done) / 1000
        stats.finished(device_seconds)
        rows: list[ItemResult] = list(self.host.numpy())
        results = rows.copy()
        for row, item in zip(rows, self.order, strict=True):
            results[item] = row
        return results


# A launched batch, or the per-item errors of one that could not launch.
_Part = _Launched | list[ItemResult]


class Runner:
    """Launches batches on the device thread(s) and, on a GPU, finishes them on another.

    The device thread only queues work: it packs a batch, launches the forward and an
    asynchronous copy of the embeddings to pinned memory, and moves on to the next batch. The
    finishing thread waits for each copy and hands the rows out. So the GPU never idles while
    Python packs the next batch or converts the last one. On a CPU the rows are ready when the
    forward returns, and the device thread hands them out itself; with several CPU device
    threads, as many batches run at once (`parallel_batches`).

    `device_threads` holds the thread the model was loaded on (see `DeviceThreads`); by
    default the runner starts its own single thread.
    """

    def __init__(
        self,
        model: LoadedModel,
        device: torch.device,
        pooling_modes: Sequence[str],
        normalize_output: bool,
        device_threads: DeviceThreads | None = None,
        vector_modules: torch.nn.Module | None = None,
    ) -> None:
        self.model = model
        self.vector_modules = vector_modules  # sentence-transformers' Dense, LayerNorm after pooling
        self.device = device
        self.pooling_modes = tuple(pooling_modes)
        self.normalize_output = normalize_output
        # One pooling mode that reads a single token the model can compute alone (CLS, last
        # token): the last layer then runs on those rows only. Fixed for the model's lifetime.
        single_mode = self.pooling_modes[0] if len(self.pooling_modes) == 1 else None
        self.row_mode = single_mode if single_mode in model.row_pooling_modes else None
        # Tests inject faults here (e.g. raise torch.OutOfMemoryError for large batches).
        self.fault_hook: Callable[[PackedBatch], None] | None = None
        self._device_threads = device_threads or DeviceThreads()
        self._finish_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
        self._broken = threading.Event()
        self._unanswered: set[Future[list[ItemResult]]] = set()
        self.stats = RunnerStats()
        self.graphs: BatchGraphs | None = None

    @property
    def alive(self) -> bool:
        return not self._broken.is_set()

    @property
    def parallel_batches(self) -> int:
        """How many batches the device threads run at once."""
        return self._device_threads.workers

    @property
    def work_split(self) -> WorkSplit | None:
        """How the batcher shares queued work among the device threads (`cpu_policy`)."""
        return self._device_threads.plan.work_split()

    def submit(self, items: Sequence[WorkItem], *, boost: bool = True) -> Future[list[ItemResult]]:
        """Queue a batch; the future holds one result (a row or an error) per item.
        `boost=False` for a share of split work: it never takes every core (`DeviceThreads`)."""
        future: Future[list[ItemResult]] = Future()
        self._unanswered.add(future)
        future.add_done_callback(self._unanswered.discard)
        self._device_threads.submit(self._launch_guarded, list(items), future, boost=boost)
        return future

    def run(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        """Run a batch on the calling thread (warm-up, tests)."""
        return _collect(self._launch_splitting(list(items)), self.stats)

    def shutdown(self) -> None:
        self._device_threads.shutdown(wait=True, cancel_futures=True)
        self._finish_thread.shutdown(wait=True, cancel_futures=True)
        # Batches still queued were dropped with the threads' queues: answer them, or whoever
        # awaits them (a request past the drain timeout) would wait forever.
        for future in list(self._unanswered):
            with contextlib.suppress(InvalidStateError):  # answered meanwhile
                future.set_exception(ServiceUnavailableError("the server is shutting down"))
        logger.info("%s", self.stats.summary())
        if self.graphs is not None:
            graph_stats = self.graphs.stats
            logger.info(
                "CUDA graphs: %d captured in %.2f s, %d batches replayed",
                graph_stats.captured,
                graph_stats.capture_s,
                graph_stats.replayed,
            )

    def _launch_guarded(self, items: list[WorkItem], future: Future[list[ItemResult]]) -> None:
        try:
            parts = self._launch_splitting(items)
        except BaseException as exc:
            # Only non-Exception throwables (SystemExit, KeyboardInterrupt...) land here.
            self._broken.set()
            logger.critical("device thread stopped: %r", exc)
            _settle(future, exc)
            raise
        if self.device.type == "cuda":
            self._finish_thread.submit(_finish, parts, future, self.stats)
        else:  # nothing to wait for: a hop to another thread would only add latency
            self._device_threads.release()  # free for the next batch before this one is answered
            _finish(parts, future, self.stats)

    def _launch_splitting(self, items: list[WorkItem]) -> list[_Part]:
        try:
            return [self._launch(items)]
        except torch.OutOfMemoryError as exc:
            self._release_cached_memory()
            if len(items) == 1:
                logger.error("out of memory on a single input of %d tokens", len(items[0].token_ids))
                return [[exc]]
            half = len(items) // 2
            logger.warning("out of memory on a batch of %d inputs: splitting it", len(items))
            return self._launch_splitting(items[:half]) + self._launch_splitting(items[half:])
        except Exception as exc:
            logger.exception("batch of %d inputs failed", len(items))
            return [[exc] * len(items)]

    @torch.inference_mode()
    def _launch(self, items: list[WorkItem]) -> _Launched:
        began = time.perf_counter()
        # Longest first: padded attention (CPU; MPNet, float32 or pre-Ampere on CUDA) pads each
        # run of similar lengths on its own.
        order = sorted(range(len(items)), key=lambda i: -len(items[i].token_ids))
        ids = [items[i].token_ids for i in order]
        batch = pack(
            ids,
            [items[i].pool_start for i in order],
            [items[i].segment_start for i in order],
            self._fillers(ids),
        )
        if self.fault_hook is not None:
            self.fault_hook(batch)
        started = None
        if self.device.type == "cuda":
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        # Graphs hold no token types: pairs run eagerly.
        graphs = self.graphs if batch.token_types is None else None
        embeddings = graphs.run(batch) if graphs is not None else None
        if embeddings is None:
            embeddings = self.embed(batch.to(self.device))[: batch.real_seqs]
        if started is None:
            self.stats.launched(began, batch.num_tokens)
            return _Launched(embeddings, order, None, None)
        host = torch.empty(embeddings.shape, dtype=embeddings.dtype, pin_memory=True)
        host.copy_(embeddings, non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        self.stats.launched(began, batch.num_tokens)
        return _Launched(host, order, started, done)

    def _fillers(self, ids: list[Sequence[int] | np.ndarray]) -> list[int]:
        """Lengths of the filler sequences for a CPU batch (see row_buckets); none on a GPU."""
        if self.device.type != "cpu":
            return []
        return filler_lengths(sum(map(len, ids)), len(ids), self.model.max_input_tokens)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """The device work of a batch already on the device: forward, pooling, normalization."""
        if self.model.pools_itself:
            embeddings = self.model.forward(batch, None)
        elif self.row_mode is not None:
            rows = token_rows(batch, self.row_mode)
            embeddings = self.model.forward(batch, rows).float()
        else:
            embeddings = pool(self.model.forward(batch, None), batch, self.pooling_modes)
        if self.vector_modules is not None:
            embeddings = self.vector_modules(embeddings.float())
        return normalize(embeddings) if self.normalize_output else embeddings

    def capture_graphs(self, sample_ids: list[int], max_tokens: int) -> None:
        """Serve batches by CUDA graph replay (CUDA only): lone short inputs' graphs are captured
        now, other batch shapes when they recur, up to a batch size where launches cost nothing."""
        from toolkit.execution.cuda_graphs import BatchGraphs  # CUDA servers only

        # Two FLOPs per parameter and token: roughly the matrix products of a forward (embedding
        # tables count too; this only sets the batch size up to which graphs are used).
        flops_per_token = 2.0 * sum(p.numel() for p in self.model.module.parameters())
        graphs = BatchGraphs(self.embed, self.device, flops_per_token)
        graphs.capture_lone_inputs(sample_ids, max_tokens)
        self.graphs = graphs if graphs.enabled else None

    def _release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _collect(parts: list[_Part], stats: RunnerStats) -> list[ItemResult]:
    results: list[ItemResult] = []
    for part in parts:
        results.extend(part.results(stats) if isinstance(part, _Launched) else part)
    return results


def _finish(parts: list[_Part], future: Future[list[ItemResult]], stats: RunnerStats) -> None:
    try:
        results = _collect(parts, stats)
    except Exception as exc:  # a CUDA error surfacing at synchronization
        logger.exception("finishing a batch failed")
        _settle(future, exc)
        return
    _settle(future, results)


def _settle(future: Future[list[ItemResult]], outcome: list[ItemResult] | BaseException) -> None:
    """Answer a batch's future, unless it was cancelled: its requests are gone, nobody waits."""
    with contextlib.suppress(InvalidStateError):
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
