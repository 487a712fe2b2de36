"""The device side: one thread that owns the model and turns PackedBatches into embeddings.

Only this module touches torch devices. A batch that fails with out-of-memory is split in halves
and retried, down to single inputs; any other failure is returned as that batch's error. The
thread itself never dies of a batch; if it dies anyway, `alive` turns False and the engine fails
new work fast instead of queueing it forever.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from toolkit.models import LoadedModel
from toolkit.packing import PackedBatch, pack
from toolkit.pooling import normalize, pool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """One input: its token ids and how many leading (prompt) tokens pooling must skip."""

    token_ids: Sequence[int]
    pool_start: int = 0


ItemResult = np.ndarray | BaseException


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        # Half precision on GPUs (bf16 keeps float32's range); exact float32 on CPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, requested)
    return dtype


class Runner:
    def __init__(
        self,
        model: LoadedModel,
        device: torch.device,
        pooling_modes: Sequence[str],
        normalize_output: bool,
    ) -> None:
        self.model = model
        self.device = device
        self.pooling_modes = tuple(pooling_modes)
        self.normalize_output = normalize_output
        # Tests inject faults here (e.g. raise torch.OutOfMemoryError for large batches).
        self.fault_hook: Callable[[PackedBatch], None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._broken = threading.Event()

    @property
    def alive(self) -> bool:
        return not self._broken.is_set()

    def submit(self, items: Sequence[WorkItem]) -> Future[list[ItemResult]]:
        """Queue a batch on the device thread; the future holds one result per item."""
        return self._executor.submit(self._run_guarded, list(items))

    def run(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        """Run a batch on the calling thread (warm-up, tests)."""
        return self._run_guarded(list(items))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _run_guarded(self, items: list[WorkItem]) -> list[ItemResult]:
        try:
            return self._run_splitting(items)
        except BaseException as exc:
            # Only non-Exception throwables (SystemExit, KeyboardInterrupt...) land here.
            self._broken.set()
            logger.critical("device thread stopped: %r", exc)
            raise

    def _run_splitting(self, items: list[WorkItem]) -> list[ItemResult]:
        try:
            return list(self._forward(items))
        except torch.OutOfMemoryError as exc:
            self._release_cached_memory()
            if len(items) == 1:
                logger.error("out of memory on a single input of %d tokens", len(items[0].token_ids))
                return [exc]
            half = len(items) // 2
            logger.warning("out of memory on a batch of %d inputs: splitting it", len(items))
            return self._run_splitting(items[:half]) + self._run_splitting(items[half:])
        except Exception as exc:
            logger.exception("batch of %d inputs failed", len(items))
            return [exc] * len(items)

    @torch.inference_mode()
    def _forward(self, items: list[WorkItem]) -> np.ndarray:
        batch = pack([item.token_ids for item in items])
        if self.fault_hook is not None:
            self.fault_hook(batch)
        batch = batch.to(self.device)
        hidden = self.model.forward(batch)
        starts = [item.pool_start for item in items]
        embeddings = pool(hidden, batch, self.pooling_modes, starts)
        if self.normalize_output:
            embeddings = normalize(embeddings)
        return embeddings.cpu().numpy()

    def _release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
