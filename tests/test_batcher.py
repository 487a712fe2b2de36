"""The batcher's queue budget, token-budget batches and per-input results, with a fake runner."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import numpy as np
import pytest

from toolkit.errors import OverloadedError
from toolkit.execution.cpu_policy import WorkSplit
from toolkit.scheduling.batcher import Batcher
from toolkit.scheduling.work import WorkItem


class FakeRunner:
    """Records batches; each row is [number of tokens]. `gate` holds the device until set."""

    alive = True
    parallel_batches = 1
    work_split: WorkSplit | None = None

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.boosts: dict[tuple[int, ...], bool] = {}  # batch -> whether it may take every core
        self.gate = threading.Event()
        self.gate.set()
        self.submits = 0
        self._submitted = asyncio.Event()  # set by every submit (the batcher's loop calls it)

    async def submitted(self, count: int) -> None:
        """Return once the batcher has handed over `count` batches in all."""
        while self.submits < count:
            self._submitted.clear()
            await asyncio.wait_for(self._submitted.wait(), 10)

    def _note_submit(self) -> None:
        self.submits += 1
        self._submitted.set()

    def submit(self, items, boost=True):  # type: ignore[no-untyped-def]
        future: Future = Future()
        self._note_submit()
        self.boosts[tuple(len(item.token_ids) for item in items)] = boost

        def work() -> None:
            self.gate.wait(10)
            self.batches.append([len(item.token_ids) for item in items])
            future.set_result([np.array([len(item.token_ids)], dtype=np.float32) for item in items])

        threading.Thread(target=work, daemon=True).start()
        return future


def items(*lengths: int) -> list[WorkItem]:
    return [WorkItem([1] * n) for n in lengths]


def test_batches_respect_the_token_budget_and_results_map_back() -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        runner.gate.clear()
        batcher = Batcher(runner, max_batch_tokens=10, max_queued_tokens=1000)  # type: ignore[arg-type]
        batcher.start()
        answer = batcher.submit(items(4, 4, 4, 12, 1))
        runner.gate.set()
        rows = await answer
        assert [int(row[0]) for row in rows] == [4, 4, 4, 12, 1]
        assert all(sum(batch) <= 10 or len(batch) == 1 for batch in runner.batches)
        assert sorted(n for batch in runner.batches for n in batch) == [1, 4, 4, 4, 12]
        await batcher.stop()

    asyncio.run(scenario())


WHOLE, HALVES = [[8, 12, 10, 10]], [[8, 12], [10, 10]]
ALL_40, TWO_20 = [[3], [5] * 8], [[3], [5] * 4, [5] * 4]


@pytest.mark.parametrize(
    ("split", "idle_both", "one_busy"),
    [
        (None, WHOLE, ALL_40),  # one device thread
        (WorkSplit(2, 0, include_busy=False), HALVES, ALL_40),  # the idle one takes it all
        (WorkSplit(2, 21, include_busy=True), HALVES, TWO_20),  # half left for whoever frees up
        (WorkSplit(2, 41, include_busy=True), WHOLE, ALL_40),  # too few tokens to share
    ],
)
def test_two_workers_share_the_queue_as_the_runner_says(
    split: WorkSplit | None, idle_both: list[list[int]], one_busy: list[list[int]]
) -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        runner.parallel_batches, runner.work_split = 2, split  # two CPU workers
        batcher = Batcher(runner, max_batch_tokens=100, max_queued_tokens=1000)  # type: ignore[arg-type]
        batcher.start()
        rows = await batcher.submit(items(8, 12, 10, 10))
        assert [int(row[0]) for row in rows] == [8, 12, 10, 10]
        assert sorted(runner.batches) == idle_both
        # A batch cut to a share never runs on every core; the whole queue may.
        assert runner.boosts.get((8, 12, 10, 10), True) and not runner.boosts.get((8, 12), False)
        runner.batches.clear()
        runner.gate.clear()
        submits = runner.submits
        busy = batcher.submit(items(3))  # holds one worker
        await runner.submitted(submits + 1)
        rest = batcher.submit(items(*[5] * 8))
        await runner.submitted(submits + 2)  # a share, or all of it, on the other worker
        runner.gate.set()
        await asyncio.gather(busy, rest)
        assert sorted(runner.batches) == one_busy
        await batcher.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("lengths", [(10, 60), (60, 10), (5, 5, 5, 5, 60)])
def test_an_input_longer_than_a_share_keeps_the_queue_whole_on_single_core_workers(
    lengths: tuple[int, ...],
) -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        runner.parallel_batches, runner.work_split = 2, WorkSplit(2, 0, include_busy=True)
        batcher = Batcher(runner, max_batch_tokens=100, max_queued_tokens=1000)  # type: ignore[arg-type]
        batcher.start()
        await batcher.submit(items(*lengths))
        # Shared, the 60-token input would run alone on one core: all of it runs on every core.
        assert runner.batches == [list(lengths)] and runner.boosts == {lengths: True}
        await batcher.stop()

    asyncio.run(scenario())


def test_workers_that_finish_together_are_both_idle_for_the_next_batch() -> None:
    class HeldRunner(FakeRunner):
        """Each batch's future waits for the test to answer it, on the event loop's thread."""

        def __init__(self) -> None:
            super().__init__()
            self.held: list[tuple[Future, list[WorkItem]]] = []

        def submit(self, items, boost=True):  # type: ignore[no-untyped-def]
            future: Future = Future()
            self._note_submit()
            self.held.append((future, list(items)))
            self.batches.append([len(item.token_ids) for item in items])
            return future

    async def scenario() -> None:
        runner = HeldRunner()
        runner.parallel_batches, runner.work_split = 2, WorkSplit(2, 0, include_busy=False)
        batcher = Batcher(runner, max_batch_tokens=100, max_queued_tokens=1000)  # type: ignore[arg-type]
        batcher.start()
        first = batcher.submit(items(1))
        await runner.submitted(1)
        second = batcher.submit(items(1))
        await runner.submitted(2)  # both workers busy
        waiting = batcher.submit(items(10, 10, 10, 10))
        for future, held in runner.held:  # both finish at once
            future.set_result([np.zeros(1, dtype=np.float32) for _ in held])
        await asyncio.gather(first, second)
        await runner.submitted(4)
        assert runner.batches[2:] == [[10, 10], [10, 10]]  # shared by the two idle workers
        for future, held in runner.held[2:]:
            future.set_result([np.zeros(1, dtype=np.float32) for _ in held])
        await waiting
        await batcher.stop()

    asyncio.run(scenario())


def test_cancelled_inputs_free_the_budget_at_once_and_never_run() -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        runner.gate.clear()  # the device is busy: everything after the first batch waits
        batcher = Batcher(runner, max_batch_tokens=8, max_queued_tokens=20)  # type: ignore[arg-type]
        batcher.start()
        first = batcher.submit(items(8))
        await runner.submitted(1)  # the first batch is on the device
        queued = batcher.submit(items(8, 8))
        with pytest.raises(OverloadedError):
            batcher.submit(items(8))
        queued.cancel()
        await asyncio.sleep(0)  # done-callbacks run
        assert batcher.queued_tokens == 0 and batcher.queued_inputs == 0
        admitted = batcher.submit(items(8, 8))
        runner.gate.set()
        await asyncio.gather(first, admitted)
        assert sum(len(batch) for batch in runner.batches) == 3  # the cancelled two never ran
        await batcher.stop()

    asyncio.run(scenario())


def test_answered_requests_are_freed_without_the_garbage_collector() -> None:
    """A request's rows hold its batch's result buffer (pinned memory on a GPU): they must go
    when the request is answered, not wait for a cyclic collection."""
    import gc
    import weakref

    async def scenario() -> list[weakref.ref]:
        runner = FakeRunner()
        batcher = Batcher(runner, max_batch_tokens=100, max_queued_tokens=1000)  # type: ignore[arg-type]
        batcher.start()
        answers = []
        for _ in range(20):
            answer = batcher.submit(items(3, 5))
            await answer
            answers.append(weakref.ref(answer))
            del answer
        await batcher.stop()
        return answers

    gc.collect()
    gc.disable()
    try:
        answers = asyncio.run(scenario())
        assert sum(ref() is not None for ref in answers) == 0
    finally:
        gc.enable()


def test_an_empty_submission_is_answered_at_once() -> None:
    async def scenario() -> None:
        batcher = Batcher(FakeRunner(), max_batch_tokens=10, max_queued_tokens=100)  # type: ignore[arg-type]
        batcher.start()
        assert await asyncio.wait_for(batcher.submit([]), 5) == []
        await batcher.stop()

    asyncio.run(scenario())


def test_a_cap_on_inputs_per_batch_splits_many_short_inputs() -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        runner.gate.clear()
        batcher = Batcher(runner, max_batch_tokens=1000, max_queued_tokens=1000, max_batch_inputs=3)  # type: ignore[arg-type]
        batcher.start()
        answer = batcher.submit(items(*[2] * 8))
        runner.gate.set()
        rows = await answer
        assert len(rows) == 8
        assert max(len(batch) for batch in runner.batches) <= 3
        await batcher.stop()

    asyncio.run(scenario())
