"""`--http-workers`: HTTP front-end processes that send token ids to the engine process.

The wire format round-trips; a front end's RemoteBatcher against the engine's BatchServer
answers, refuses, withdraws and fails like the in-process batcher; and a real server with two
front ends embeds like sentence-transformers, reports errors in the OpenAI shape, and leaves no
process behind, whether it is stopped or its engine dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor as Pool
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from tests.helpers.waiting import wait_until
from toolkit.errors import InferenceError, OverloadedError, ServiceUnavailableError
from toolkit.scheduling import wire
from toolkit.scheduling.batch_server import BatchServer
from toolkit.scheduling.batcher import Batcher
from toolkit.scheduling.remote import RemoteBatcher, connect_to_engine
from toolkit.scheduling.timing import RequestTiming
from toolkit.scheduling.work import WorkItem
from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

# --- the wire ---------------------------------------------------------------------------------


def test_submit_frames_carry_token_ids_pool_and_segment_starts() -> None:
    items = [WorkItem([5, 6, 7], 1), WorkItem([8]), WorkItem(list(range(300)), 2, 150)]
    encoded = wire.encode_submit(42, items)
    length, kind, request_id = wire.HEADER.unpack_from(encoded)
    assert (kind, request_id, length) == (wire.SUBMIT, 42, len(encoded) - wire.HEADER.size)
    decoded = wire.decode_submit(encoded[wire.HEADER.size :])
    assert [list(item.token_ids) for item in decoded] == [list(item.token_ids) for item in items]
    assert [item.pool_start for item in decoded] == [1, 0, 2]
    assert [item.segment_start for item in decoded] == [0, 0, 150]


def test_a_submit_frame_whose_ids_do_not_add_up_is_refused() -> None:
    body = wire.encode_submit(1, [WorkItem([1, 2, 3])])[wire.HEADER.size :]
    with pytest.raises(ValueError, match="announces 3 token ids"):
        wire.decode_submit(body[:-4])


def test_result_frames_carry_rows_and_stage_times() -> None:
    rows = [np.arange(4, dtype=np.float32), -np.arange(4, dtype=np.float32)]
    encoded = wire.encode_result(7, rows, 0.25)
    result = wire.decode_result(encoded[wire.HEADER.size :])
    np.testing.assert_array_equal(np.stack(result.rows), np.stack(rows))
    assert result.queue_s == 0.25


def test_errors_cross_as_themselves_and_anything_else_as_a_generic_inference_error() -> None:
    overloaded = wire.decode_error(
        wire.encode_error(1, OverloadedError("full", retry_after_s=3))[wire.HEADER.size :]
    )
    assert isinstance(overloaded, OverloadedError) and overloaded.headers() == {"Retry-After": "3"}
    unavailable = wire.decode_error(wire.encode_error(1, ServiceUnavailableError("gone"))[wire.HEADER.size :])
    assert type(unavailable) is ServiceUnavailableError and unavailable.status_code == 503
    bug = wire.decode_error(wire.encode_error(1, KeyError("a model bug"))[wire.HEADER.size :])
    assert type(bug) is InferenceError and "model bug" not in bug.message


# --- front end against engine, in one process ------------------------------------------------


class GatedRunner:
    """Each row is [number of tokens]; `gate` holds the device until set."""

    alive = True
    parallel_batches = 1
    work_split = None

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.shut_down = False

    def submit(self, items, boost=True):  # type: ignore[no-untyped-def]
        future: Future = Future()

        def work() -> None:
            self.gate.wait(10)
            future.set_result([np.array([len(item.token_ids)], dtype=np.float32) for item in items])

        threading.Thread(target=work, daemon=True).start()
        return future

    def shutdown(self) -> None:
        self.shut_down = True


@dataclass
class Link:
    runner: GatedRunner
    batcher: Batcher
    remote: RemoteBatcher
    engine_ends: list[asyncio.StreamWriter]  # the engine side of each front end's connection
    lost: list[BaseException]


@asynccontextmanager
async def linked(tmp_path: Path, *, held: bool, max_batch_tokens: int, max_queued_tokens: int = 1000):  # type: ignore[no-untyped-def]
    """A Batcher over a GatedRunner (its gate closed if `held`), served by a BatchServer on one
    end of a socket pair, and a started RemoteBatcher on the other."""
    runner = GatedRunner()
    if held:
        runner.gate.clear()
    batcher = Batcher(runner, max_batch_tokens, max_queued_tokens)  # type: ignore[arg-type]
    batcher.start()
    service = BatchServer(batcher, {"limits": {}, "embedding_dim": 1})
    batcher.on_batch = service.report_batch
    engine_ends: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        engine_ends.append(writer)
        await service.handle(reader, writer)

    engine_end, front_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=engine_end)
    serving = asyncio.create_task(handle(reader, writer))
    link, served = await asyncio.to_thread(connect_to_engine, front_end.detach())
    assert served == {"limits": {}, "embedding_dim": 1}
    lost: list[BaseException] = []
    remote = RemoteBatcher(link, lost.append)
    remote.start()
    try:
        yield Link(runner, batcher, remote, engine_ends, lost)
    finally:
        runner.gate.set()
        await remote.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await batcher.stop()


async def _until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_remote_requests_are_answered_with_their_rows_and_stage_times(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with linked(tmp_path, held=False, max_batch_tokens=8) as link:
            remote, timing = link.remote, RequestTiming()
            batches: list[tuple[int, int, float]] = []
            remote.on_batch = lambda *report: batches.append(report)
            first = remote.submit([WorkItem([1] * n) for n in (3, 5, 9)], timing)
            second = remote.submit([WorkItem([1, 2])])
            assert [int(row[0]) for row in await first] == [3, 5, 9]
            assert [int(row[0]) for row in await second] == [2]
            assert timing.admitted is not None and timing.batched is not None
            # Every engine batch is reported to the front end, with the queue left after it.
            await _until(lambda: sum(inputs for inputs, _, _ in batches) == 4)
            assert sum(tokens for _, tokens, _ in batches) == 19
            assert all(seconds >= 0 for _, _, seconds in batches)
            assert remote.queued_inputs == 0 and remote.queued_tokens == 0
            assert await remote.submit([]) == []

    asyncio.run(scenario())


def test_a_full_engine_queue_refuses_with_429_through_the_link(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with linked(tmp_path, held=True, max_batch_tokens=4, max_queued_tokens=12) as link:
            held = [link.remote.submit([WorkItem([1] * 4)]) for _ in range(3)]  # 2 on the device, 1 queued
            await _until(lambda: link.batcher.queued_tokens == 4)
            refused = link.remote.submit([WorkItem([1] * 9)])  # 4 queued + 9 > 12
            with pytest.raises(OverloadedError):
                await refused
            link.runner.gate.set()
            assert [int((await answer)[0][0]) for answer in held] == [4, 4, 4]

    asyncio.run(scenario())


def test_a_cancelled_remote_request_leaves_the_engine_queue(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with linked(tmp_path, held=True, max_batch_tokens=4) as link:
            busy = [link.remote.submit([WorkItem([1] * 4)]) for _ in range(2)]  # both device slots
            waiting = link.remote.submit([WorkItem([1] * 3)])
            await _until(lambda: link.batcher.queued_inputs == 1)
            waiting.cancel()
            await _until(lambda: link.batcher.queued_inputs == 0)
            link.runner.gate.set()
            await asyncio.gather(*busy)

    asyncio.run(scenario())


def test_losing_the_engine_fails_waiting_requests_with_503_and_reports_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with linked(tmp_path, held=True, max_batch_tokens=4) as link:
            waiting = link.remote.submit([WorkItem([1, 2, 3])])
            await _until(lambda: len(link.engine_ends) == 1)
            link.engine_ends[0].transport.abort()  # the engine process dies
            with pytest.raises(ServiceUnavailableError):
                await waiting
            await _until(lambda: bool(link.lost))
            assert not link.remote.alive
            with pytest.raises(ServiceUnavailableError):
                link.remote.submit([WorkItem([1])])

    asyncio.run(scenario())


# --- a real server with two front ends --------------------------------------------------------

TEXTS = ["Once upon a time", "A second, somewhat longer input text.", "third"]


def _processes(root: int) -> list[psutil.Process]:
    parent = psutil.Process(root)
    return [parent, *parent.children(recursive=True)]


def _all_gone(processes: list[psutil.Process], timeout: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@contextmanager
def two_front_end_server() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A real server with two front ends; once the test is done, it must stop with exit 0 and
    leave none of its processes behind."""
    process, port = launch_server_cmd("python3 -m toolkit.launch_server --http-workers 2", host="127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    family: list[psutil.Process] = []
    try:
        wait_for_server(url, timeout=180, process=process)
        yield process, url
        family = _processes(process.pid)
    finally:
        terminate_process(process)
    assert process.returncode == 0
    assert _all_gone(family, timeout=10)


@pytest.mark.subprocess
def test_two_front_ends_embed_like_sentence_transformers_and_stop_cleanly() -> None:
    from sentence_transformers import SentenceTransformer

    from toolkit.service.model_source import bundled_model_dir

    reference = SentenceTransformer(str(bundled_model_dir()), device="cpu").encode(TEXTS)
    with two_front_end_server() as (process, url):
        assert len(_processes(process.pid)) == 3  # the engine and its two front ends

        def embed(texts: list[str]) -> np.ndarray:
            response = requests.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=60)
            assert response.status_code == 200, response.text
            return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)

        with Pool(8) as pool:  # concurrent requests spread over both front ends, all answered
            answers = list(pool.map(embed, [TEXTS] * 24))
        for vectors in answers:
            cos = (
                (vectors * reference).sum(1)
                / np.linalg.norm(vectors, axis=1)
                / np.linalg.norm(reference, axis=1)
            )
            assert cos.min() >= 0.99999 and np.abs(vectors - reference).max() <= 1e-5
        bad = requests.post(f"{url}/v1/embeddings", json={"input": [[1, 10**9]]}, timeout=10)
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
        info = requests.get(f"{url}/get_model_info", timeout=10).json()
        assert info["embedding_dim"] == 384 and info["max_model_len"] == 256
        for _ in range(4):  # whichever front end a scrape reaches, it shows the engine's batches
            metrics = requests.get(f"{url}/metrics", timeout=10).text
            batch_count = [
                line for line in metrics.splitlines() if line.startswith("toolkit_batch_tokens_count")
            ]
            assert batch_count and float(batch_count[0].split()[-1]) > 0, metrics


@pytest.mark.subprocess
def test_a_front_end_that_dies_is_replaced_and_the_server_keeps_serving() -> None:
    with two_front_end_server() as (process, url):
        engine = psutil.Process(process.pid)
        first = engine.children()
        first[0].kill()  # as the kernel's OOM killer would
        before = ({first[1].pid}, {p.pid for p in first})
        wait_until(lambda: {child.pid for child in engine.children()} not in before, "a replacement", 60)
        assert len(engine.children()) == 2
        wait_for_server(url, timeout=60, process=process)
        for _ in range(6):  # both front ends answer
            response = requests.post(f"{url}/v1/embeddings", json={"input": ["still here"]}, timeout=30)
            assert response.status_code == 200, response.text


@pytest.mark.subprocess
def test_front_ends_exit_when_their_engine_dies() -> None:
    process, port = launch_server_cmd("python3 -m toolkit.launch_server --http-workers 2", host="127.0.0.1")
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=180, process=process)
        front_ends = psutil.Process(process.pid).children()
        assert len(front_ends) == 2
        os.kill(process.pid, signal.SIGKILL)
        assert _all_gone(front_ends, timeout=15)
    finally:
        terminate_process(process)


# --- start-up and stop edge cases of the engine process ---------------------------------------

# The server's main with the device thread's loading replaced: it first sleeps (a long load,
# compile and graph capture), then raises or loads for real.
_STUBBED_LOAD = """
import sys, time
import toolkit.execution.assembly as assembly
from toolkit.errors import ModelLoadError
real_load = assembly._load_on_device_thread
def load(*args):
    time.sleep(float(sys.argv[1]))
    if sys.argv[2] == "fail":
        raise ModelLoadError("no usable weights")
    return real_load(*args)
assembly._load_on_device_thread = load
from toolkit.launch_server import main
sys.exit(main(sys.argv[3:]))
"""


def _start_stubbed(sleep_s: float, outcome: str, port: int, workers: int = 2) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-c",
        _STUBBED_LOAD,
        str(sleep_s),
        outcome,
        "--http-workers",
        str(workers),
        "--port",
        str(port),
    ]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_front_ends(process: subprocess.Popen[str], count: int) -> list[psutil.Process]:
    started = lambda: len(psutil.Process(process.pid).children()) >= count  # noqa: E731
    wait_until(lambda: process.poll() is not None or started(), f"{count} front ends", 60)
    assert process.poll() is None
    return psutil.Process(process.pid).children()


@pytest.mark.subprocess
def test_a_stop_while_the_model_loads_ends_engine_and_front_ends_at_once() -> None:
    port = _free_port()
    process = _start_stubbed(120, "load", port)
    try:
        front_ends = _wait_front_ends(process, 2)
        # The front ends are up (serving /health) and waiting for their engine.
        wait_until(lambda: requests_status(f"http://127.0.0.1:{port}/health") == 503, "front ends up", 60)
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=20)  # not the 120 s the load would take
        assert process.returncode == 0
        assert "Stopped while the model was loading." in output
        assert _all_gone(front_ends, timeout=10)
    finally:
        _kill_group(process)


@pytest.mark.subprocess
def test_a_one_process_server_stopped_while_loading_exits_at_once() -> None:
    port = _free_port()
    process = _start_stubbed(120, "load", port, workers=0)
    try:
        serving = lambda: requests_status(f"http://127.0.0.1:{port}/health") == 503  # noqa: E731
        wait_until(lambda: serving() or process.poll() is not None, "serving, not loaded", 60)
        assert process.poll() is None
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=20)  # not the 120 s the load would take
        assert process.returncode == 0
    finally:
        _kill_group(process)


def requests_status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.ConnectionError:
        return None


@pytest.mark.subprocess
def test_a_failed_load_exits_1_with_one_clear_line_and_stops_the_front_ends() -> None:
    process = _start_stubbed(2, "fail", _free_port())
    try:
        front_ends = _wait_front_ends(process, 2)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 1
        assert "loading the model failed: no usable weights" in output
        assert "Traceback" not in output
        assert _all_gone(front_ends, timeout=5)
    finally:
        _kill_group(process)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def _kill_group(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()  # reaps it and closes its output pipe


@pytest.mark.subprocess
def test_front_ends_get_the_api_key_by_environment_not_argv() -> None:
    """Every user can read a process's argv (ps, /proc/PID/cmdline); its environment only its
    owner can."""
    process, port = launch_server_cmd(
        "python3 -m toolkit.launch_server --http-workers 2 --api-key sesame-123", host="127.0.0.1"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout=180, api_key="sesame-123", process=process)
        front_ends = psutil.Process(process.pid).children()
        assert len(front_ends) == 2
        assert all("sesame-123" not in " ".join(child.cmdline()) for child in front_ends)
        for _ in range(4):  # whichever front end answers
            good = requests.post(
                f"{url}/v1/embeddings", json={"input": "hi"}, headers={"Authorization": "Bearer sesame-123"}
            )
            assert good.status_code == 200
            assert requests.post(f"{url}/v1/embeddings", json={"input": "hi"}).status_code == 401
    finally:
        terminate_process(process)
