"""Fault injection and probes for the hardening tests (no tests here).

Device faults are injected through `Runner.fault_hook`, which runs on the device thread with each
packed batch: `DeviceGate` holds batches there until released (so that requests queue up behind
them) and records what reached the device. Inputs are token ids around marker tokens, so a test
can tell which request a batch came from.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.waiting import WAIT_S, wait_until
from toolkit.models.packed_batch import PackedBatch

CLS, SEP = 101, 102  # MiniLM's [CLS] and [SEP]


def ids(*markers: int) -> list[int]:
    return [CLS, *markers, SEP]


@dataclass
class DeviceGate:
    """A fault_hook: records every batch, holds the first `hold` batches until released, and
    raises `fault(batch)` when that returns an exception. `hold` None: as many batches as the
    device threads run at once (set by `device_held`)."""

    hold: int | None = None
    fault: Callable[[PackedBatch], BaseException | None] = lambda batch: None
    released: threading.Event = field(default_factory=threading.Event)
    batches: list[list[int]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def __call__(self, batch: PackedBatch) -> None:
        self.batches.append(batch.input_ids.tolist())
        self.sizes.append(batch.real_seqs)
        if len(self.batches) <= (self.hold or 0) and not self.released.wait(WAIT_S):
            raise RuntimeError("the test never released the device")
        error = self.fault(batch)
        if error is not None:
            raise error

    def saw(self, token: int) -> bool:
        return any(token in batch for batch in self.batches)


class SubmitSpy:
    """Wraps Batcher.submit to count the requests the batcher admitted."""

    def __init__(self, batcher: Any) -> None:
        self.batcher = batcher
        self.original = batcher.submit
        self.admitted = 0
        batcher.submit = self

    def __call__(self, items: Any, timing: Any = None) -> Any:
        futures = self.original(items, timing)
        self.admitted += 1
        return futures

    def restore(self) -> None:
        self.batcher.submit = self.original


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += _receive(sock)
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(payload) < int(headers.get("content-length", 0)):
        payload += _receive(sock)
    return int(lines[0].split()[1]), headers, payload


def _receive(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the server closed the connection mid-answer")
    return data


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset[Any]], float]:
    text = requests.get(f"{url}/metrics", headers=headers, timeout=WAIT_S).text
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[Any]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@contextmanager
def device_held(
    batcher: Any,
    gate: DeviceGate,
    post: Callable[[dict[str, Any]], Any],
    marker: int,
    workers: int,
) -> Iterator[tuple[ThreadPoolExecutor, Future[Any], Future[Any]]]:
    """Install `gate` on the runner and fill both in-flight batch slots: with one device thread,
    one request held on the device and one handed to the thread behind it; with two (a CPU's
    workers), both held on the device. Whatever is posted next waits in the batcher's queue.
    Yields (pool, held, second); `workers` threads post. On the way out the gate is released
    before the pool waits for its requests, so a failing test cannot hang."""
    if gate.hold is None:
        gate.hold = batcher.runner.parallel_batches
    batcher.runner.fault_hook = gate
    spy = SubmitSpy(batcher)
    try:
        with ThreadPoolExecutor(workers) as pool:
            try:
                held = pool.submit(post, {"input": [ids(marker)]})
                wait_until(lambda: len(gate.batches) == 1, "the first batch reached the device")
                second = pool.submit(post, {"input": [ids(marker + 1)]})
                wait_until(lambda: spy.admitted == 2 and batcher.queued_inputs == 0, "the second batch left")
                yield pool, held, second
            finally:
                gate.released.set()
    finally:
        spy.restore()
        batcher.runner.fault_hook = None
