"""The Runner's device thread: shutting down answers every batch it was given."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.model_zoo import build_tiny_model
from toolkit.errors import ServiceUnavailableError
from toolkit.execution.runner import Runner
from toolkit.models.loader import load_model
from toolkit.scheduling.work import WorkItem
from toolkit.service.model_spec import read_embedding_spec


def test_shutdown_answers_batches_still_queued() -> None:
    spec = read_embedding_spec(build_tiny_model("bert", Path(tempfile.mkdtemp())))
    model = load_model(spec.transformer_dir, torch.device("cpu"), torch.float32)
    runner = Runner(model, torch.device("cpu"), spec.pooling_modes, spec.normalize)
    on_device, release = threading.Event(), threading.Event()

    def hold(_batch: object) -> None:
        on_device.set()
        release.wait(10)

    runner.fault_hook = hold
    running = runner.submit([WorkItem([1, 5, 2])])
    assert on_device.wait(10)
    queued = runner.submit([WorkItem([1, 6, 2])])  # waits behind the held batch
    stopping = threading.Thread(target=runner.shutdown)
    stopping.start()
    # Release the device only once shutdown has dropped the queued batch. ThreadPoolExecutor
    # flags _shutdown and drops its queue under _shutdown_lock (CPython internals, test only).
    executor = runner._device_threads._threads[0]
    deadline = time.monotonic() + 10
    while not executor._shutdown and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.001)
    with executor._shutdown_lock:  # type: ignore[attr-defined]
        pass
    release.set()
    stopping.join(10)
    assert not stopping.is_alive()
    assert running.result(timeout=10)[0].shape == (model.hidden_size,)
    with pytest.raises(ServiceUnavailableError):
        queued.result(timeout=10)
