"""The scheduler: one asyncio task owns the queue and cuts it into token-budget batches.

Every input is its own entry, so inputs of concurrent requests share batches; a request has one
future, resolved when its last input is back. A batch is filled in arrival order up to
`max_batch_tokens` (an input longer than the budget runs alone); entries whose request is gone
are skipped. Two batches may be in flight: while the device runs one, the next is already packed
and waiting. A CPU with several device threads runs as many batches side by side, and a batch may
take only a share of the queued tokens, as the runner's `work_split` rule says, so that one
request's inputs run on every worker instead of one. A batch's failure fails the requests of its
inputs and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from toolkit.errors import InferenceError, OverloadedError, ServiceUnavailableError
from toolkit.scheduling.timing import RequestTiming
from toolkit.scheduling.work import ItemResult, WorkItem

logger = logging.getLogger(__name__)

_IN_FLIGHT_BATCHES = 2
# Work waiting this long without a batch finishing means the device has stopped: not ready.
STALL_AFTER_S = 120.0


class WorkSplitRule(Protocol):
    def share(
        self, queued_tokens: int, running: int, max_batch_tokens: int, has_longer: Callable[[int], bool]
    ) -> int:
        """The tokens the next batch should hold (`toolkit.execution.cpu_policy.WorkSplit`)."""


class DeviceRunner(Protocol):
    """What the batcher needs of the device side (`toolkit.execution.runner.Runner`)."""

    @property
    def alive(self) -> bool: ...

    @property
    def parallel_batches(self) -> int: ...

    @property
    def work_split(self) -> WorkSplitRule | None: ...

    def submit(self, items: Sequence[WorkItem], *, boost: bool = True) -> Future[list[ItemResult]]: ...

    def shutdown(self) -> None: ...


@dataclass(eq=False)
class Submission:
    """One request's inputs: their rows fill in as batches finish; `future` gets them all, or the
    first error. One future per request, not per input: the event loop is the server's
    bottleneck with small models, and each future costs it callbacks."""

    future: asyncio.Future[list[np.ndarray]]
    rows: list[np.ndarray | None]
    timing: RequestTiming | None
    entries: list[Entry] = field(default_factory=list)
    pending: int = 0

    def deliver(self, index: int, result: ItemResult) -> None:
        if self.future.done():
            return
        if isinstance(result, BaseException):
            self.future.set_exception(_client_error(result))
            return
        self.rows[index] = result
        self.pending -= 1
        if self.pending == 0:
            self.future.set_result(self.rows)  # type: ignore[arg-type]  # every row is set


@dataclass(eq=False)
class Entry:
    item: WorkItem
    submission: Submission = field(repr=False)
    index: int
    waiting: bool = True  # counted in the queue budget until taken or withdrawn

    @property
    def num_tokens(self) -> int:
        return len(self.item.token_ids)


class Batcher:
    def __init__(
        self,
        runner: DeviceRunner,
        max_batch_tokens: int,
        max_queued_tokens: int,
        max_queued_inputs: int | None = None,
        max_batch_inputs: int | None = None,
    ) -> None:
        self.runner = runner
        self.max_batch_tokens = max_batch_tokens
        # Inputs per batch, for models whose rows cost more than their tokens (a sparse model's
        # rows span its vocabulary); None: tokens alone decide.
        self.max_batch_inputs = max_batch_inputs
        self.max_queued_tokens = max_queued_tokens
        self.max_queued_inputs = max_queued_inputs
        # Metrics hook: called once per finished batch with (inputs, tokens, seconds).
        self.on_batch: Callable[[int, int, float], None] | None = None
        self._queue: deque[Entry] = deque()
        # Budget counters cover waiting entries only: a cancelled request frees its share at
        # once, though its entries stay in the deque until the loop passes them.
        self._queued_tokens = 0
        self._queued_inputs = 0
        self._wakeup = asyncio.Event()
        # On a GPU, one batch runs while the next waits packed; a CPU with several device threads
        # runs as many batches side by side.
        self._slots = asyncio.Semaphore(max(_IN_FLIGHT_BATCHES, runner.parallel_batches))
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        # Batches holding a slot. Counted down before the slot is given back: the loop, woken by
        # that, counts idle device threads, and a finished task leaves `_in_flight` only later.
        self._running = 0
        self._last_progress = time.monotonic()  # a batch finished, or work came to an idle queue

    @property
    def queued_inputs(self) -> int:
        return self._queued_inputs

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def alive(self) -> bool:
        task_ok = self._task is not None and not self._task.done()
        return task_ok and self.runner.alive

    @property
    def engines_alive(self) -> int:
        return int(self.alive)

    @property
    def stalled(self) -> bool:
        """Whether work has waited `STALL_AFTER_S` without any batch finishing."""
        busy = self._running > 0 or self._queued_inputs > 0
        return busy and time.monotonic() - self._last_progress > STALL_AFTER_S

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        self._task.add_done_callback(self._loop_ended)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_queued(ServiceUnavailableError("the server is shutting down"))

    async def close(self) -> None:
        """Stop, then shut the runner down (its device thread finishes what it holds)."""
        await self.stop()
        self.runner.shutdown()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        # Should the loop ever die, nothing would take the queue again: fail it instead of hanging.
        if not task.cancelled():
            logger.critical("the batcher stopped: %r", task.exception())
            self._fail_queued(ServiceUnavailableError("the inference worker is not running"))

    def submit(
        self, items: Sequence[WorkItem], timing: RequestTiming | None = None
    ) -> asyncio.Future[list[np.ndarray]]:
        """Admit all items or none: refused with 429 when the queue would exceed its budget.
        The future holds one row per item, in order; cancelling it withdraws the items."""
        if not self.alive:
            raise ServiceUnavailableError("the inference worker is not running")
        tokens = sum(len(item.token_ids) for item in items)
        if self._queued_tokens and self._queued_tokens + tokens > self.max_queued_tokens:
            raise OverloadedError(f"the server has {self._queued_tokens} tokens queued; retry shortly")
        if (
            self.max_queued_inputs is not None
            and self._queued_inputs
            and self._queued_inputs + len(items) > self.max_queued_inputs
        ):
            raise OverloadedError(f"the server has {self._queued_inputs} inputs queued; retry shortly")
        submission = Submission(asyncio.get_running_loop().create_future(), [None] * len(items), timing)
        if not items:
            submission.future.set_result([])
            return submission.future
        submission.entries = [Entry(item, submission, index) for index, item in enumerate(items)]
        submission.pending = len(items)
        if timing is not None:
            timing.admitted = time.perf_counter()
        submission.future.add_done_callback(lambda _: self._withdraw_all(submission))
        if not self._running and not self._queued_inputs:
            self._last_progress = time.monotonic()  # an idle batcher has not stalled
        self._queue.extend(submission.entries)
        self._queued_tokens += tokens
        self._queued_inputs += len(items)
        self._wakeup.set()
        return submission.future

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            await self._slots.acquire()
            share = self._share_tokens()
            batch = self._take_batch(share)
            if not batch:
                self._slots.release()
                self._wakeup.clear()
                continue
            # A share of split work never runs on every core, even if it starts before the
            # other shares are submitted.
            task = asyncio.create_task(self._run(batch, boost=share >= self.max_batch_tokens))
            self._running += 1
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def _take_batch(self, share: int) -> list[Entry]:
        batch: list[Entry] = []
        tokens = 0
        while self._queue:
            entry = self._queue[0]
            if entry.submission.future.done():  # the client went away: never reaches the device
                self._queue.popleft()
                self._withdraw(entry)
                continue
            if batch and tokens + entry.num_tokens > self.max_batch_tokens:
                break
            if self.max_batch_inputs is not None and len(batch) >= self.max_batch_inputs:
                break
            if batch and tokens + entry.num_tokens // 2 > share:  # nearer the share without it
                break
            self._queue.popleft()
            self._withdraw(entry)
            batch.append(entry)
            tokens += entry.num_tokens
        if batch and logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "Batch. #seq: %d, #token: %d, #queue-seq: %d, #queue-token: %d",
                len(batch),
                tokens,
                self._queued_inputs,
                self._queued_tokens,
            )
        return batch

    def _share_tokens(self) -> int:
        """The tokens the next batch should hold: `max_batch_tokens`, or a share of the queue
        where the runner splits work among several device threads."""
        split = self.runner.work_split
        if split is None:
            return self.max_batch_tokens
        return split.share(self._queued_tokens, self._running, self.max_batch_tokens, self._has_longer)

    def _has_longer(self, tokens: int) -> bool:
        return any(e.waiting and e.num_tokens > tokens for e in self._queue)

    async def _run(self, batch: list[Entry], boost: bool) -> None:
        results: list[ItemResult]
        started = time.perf_counter()
        _stamp_batched(batch, started)
        try:
            results = await asyncio.wrap_future(self.runner.submit([e.item for e in batch], boost=boost))
        except asyncio.CancelledError:
            results = [ServiceUnavailableError("the server is shutting down")] * len(batch)
            raise
        except BaseException as exc:  # the device thread is gone; its SystemExit arrives here as a value
            logger.error("batch could not run: %r", exc)
            results = [ServiceUnavailableError("the inference worker is not running")] * len(batch)
            if not self.runner.alive:  # nothing queued will ever run: fail it now, not on a timeout
                self._fail_queued(ServiceUnavailableError("the inference worker is not running"))
        finally:
            self._running -= 1
            self._last_progress = time.monotonic()
            self._slots.release()
            for entry, result in zip(batch, results, strict=True):
                entry.submission.deliver(entry.index, result)
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(e.num_tokens for e in batch), time.perf_counter() - started)

    def _withdraw(self, entry: Entry) -> None:
        """Take an entry out of the queue budget (once): it was batched, cancelled or failed."""
        if entry.waiting:
            entry.waiting = False
            self._queued_tokens -= entry.num_tokens
            self._queued_inputs -= 1

    def _withdraw_all(self, submission: Submission) -> None:
        """A request is answered, failed or cancelled: its inputs still queued leave the budget
        at once (the loop drops their entries when it passes them)."""
        for entry in submission.entries:
            self._withdraw(entry)
        # Entries point at their submission: dropping the list back breaks the cycle, so the
        # request's rows are freed by reference counting, not left for the garbage collector.
        submission.entries = []

    def _fail_queued(self, error: Exception) -> None:
        while self._queue:
            entry = self._queue.popleft()
            self._withdraw(entry)
            entry.submission.deliver(entry.index, error)


def _stamp_batched(batch: list[Entry], now: float) -> None:
    for entry in batch:
        timing = entry.submission.timing
        if timing is not None and timing.batched is None:
            timing.batched = now


def _client_error(error: BaseException) -> BaseException:
    """What a client may see of a failure: the server's own errors as they are; anything else
    (a model bug) as a generic InferenceError, with details in the server log."""
    if isinstance(error, InferenceError | ServiceUnavailableError):
        return error
    return InferenceError("the model failed on this input; the server log has details")
