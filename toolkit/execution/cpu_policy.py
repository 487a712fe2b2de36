"""How a CPU server spreads its work over the cores, in one place: how many device threads run
batches, how many torch threads each batch gets, and how the batcher shares a queue among them.

- Workers: `--cpu-workers`, at most one per core; by default two on a 2-core machine (two
  single-core forwards side by side beat one forward on both cores) and one elsewhere (on larger
  machines an input that cannot be split would run on one worker's share).
- Threads: each worker gets an equal share of the cores. Where that share is one core, the first
  worker runs a batch that is alone on every core: a short forward is bound by reading the
  weights, which all cores then share.
- Sharing: workers of several cores each share all work among the idle ones; workers of one core
  each share a queue of at least `MIN_SHARED_BATCH_TOKENS` per worker among all of them, busy ones
  included, unless an input is longer than a share (it would run alone on one core).
- Batch size: a worker of one core takes batches of at most `ONE_CORE_BATCH_TOKENS`, whose
  activations stay nearer its cache; a worker of several cores splits each product among its
  threads, and wants `SEVERAL_CORES_BATCH_TOKENS`.

Pure logic, no torch: `DeviceThreads` applies the thread counts, `Batcher` the sharing. The
measurements behind each rule are in docs/performance.md ("CPU workers").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MIN_SHARED_BATCH_TOKENS = 256
ONE_CORE_BATCH_TOKENS = 2048
SEVERAL_CORES_BATCH_TOKENS = 8192


def default_workers(requested: int | None, cores: int) -> int:
    """Device threads for a CPU server: `--cpu-workers` capped at one per core, else 2 on 2 cores
    and 1 elsewhere."""
    if requested is not None:
        return min(requested, cores)
    return 2 if cores == 2 else 1


@dataclass(frozen=True)
class WorkSplit:
    """How the batcher shares queued work among `threads` CPU device threads."""

    threads: int
    min_tokens: int  # queued tokens from which a batch takes only a share of the queue
    # Shares counted for every thread, busy ones too: a batch takes at most 1/threads of the
    # queue and leaves the rest to whichever thread frees up next. Else for the idle ones only.
    include_busy: bool

    def share(
        self, queued_tokens: int, running: int, max_batch_tokens: int, has_longer: Callable[[int], bool]
    ) -> int:
        """The tokens the next batch should hold, given the queue, the batches running and
        `has_longer(n)`: whether a waiting input is longer than n tokens."""
        if queued_tokens < self.min_tokens:
            return max_batch_tokens
        sharing = self.threads if self.include_busy else self.threads - running
        if sharing <= 1:
            return max_batch_tokens
        share = -(-queued_tokens // sharing)
        if share >= max_batch_tokens:
            return max_batch_tokens
        if self.include_busy and has_longer(share):
            return max_batch_tokens
        return share


@dataclass(frozen=True)
class ThreadPlan:
    """Torch threads per batch for `workers` device threads on `cores` cores."""

    workers: int
    cores: int

    @property
    def share(self) -> int:
        """Each worker's torch threads."""
        return max(1, self.cores // self.workers)

    @property
    def lone(self) -> int:
        """The first worker's threads for a batch that runs alone: every core, but only where the
        share is one thread, or the OpenMP teams would exceed the cores for good."""
        return self.cores if self.share == 1 else self.share

    @property
    def batch_tokens(self) -> int:
        """The token budget of a batch, where the server's flag does not set it."""
        return ONE_CORE_BATCH_TOKENS if self.share == 1 else SEVERAL_CORES_BATCH_TOKENS

    @property
    def boosts_lone_batches(self) -> bool:
        return self.lone > self.share

    def threads_for(self, worker: int, *, alone: bool, boost: bool) -> int:
        """Torch threads for a batch on `worker`; `boost=False` for a share of split work."""
        return self.lone if boost and alone and worker == 0 else self.share

    def work_split(self) -> WorkSplit | None:
        """How the batcher shares queued work among the workers; None for one worker."""
        if self.workers == 1:
            return None
        if self.boosts_lone_batches:
            return WorkSplit(self.workers, MIN_SHARED_BATCH_TOKENS * self.workers, include_busy=True)
        return WorkSplit(self.workers, 0, include_busy=False)
