"""Faults, overload and shutdown: 429 with Retry-After, clients that leave, out-of-memory batches, a
dead device thread or scheduler, the drain, and SIGTERM under load against a real process.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import pytest
import requests
import torch

from tests.helpers.api_calls import assert_openai_error
from tests.helpers.faults import (
    DeviceGate,
    device_held,
    ids,
    port_of,
    sample,
    scrape,
)
from tests.helpers.servers import ThreadedServer
from tests.helpers.waiting import WAIT_S, wait_until
from toolkit.models.packed_batch import PackedBatch
from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

# --- backpressure and disconnects ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fresh_client", [["--max-queued-tokens", "16", "--max-queued-inputs", "4"]], indirect=True
)
def test_full_queue_answers_429_with_retry_after_then_recovers(fresh_client) -> None:
    batcher = fresh_client.state.service.queue
    gate = DeviceGate()
    post = lambda body: fresh_client.post("/v1/embeddings", json=body)  # noqa: E731
    with device_held(batcher, gate, post, marker=1001, workers=3) as (pool, held, second):
        queued = pool.submit(post, {"input": [ids(*[1003] * 8)]})  # 10 tokens wait in the queue
        wait_until(lambda: batcher.queued_tokens == 10, "the third request queued")
        too_many_tokens = post({"input": [ids(*[1004] * 8)]})
        too_many_inputs = post({"input": [[1005]] * 4})
        gate.released.set()
        results = [held.result(timeout=WAIT_S), second.result(timeout=WAIT_S), queued.result(timeout=WAIT_S)]
    for refused in (too_many_tokens, too_many_inputs):
        error = assert_openai_error(refused, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "server_overloaded"
        assert refused.headers["Retry-After"] == "1"
    assert [r.status_code for r in results] == [200, 200, 200]
    assert post({"input": [ids(*[1004] * 8)]}).status_code == 200
    assert post({"input": [[1005]] * 4}).status_code == 200


def test_disconnected_clients_inputs_never_reach_the_device(threaded_server: ThreadedServer) -> None:
    state = threaded_server.state
    batcher = state.service.queue
    gate = DeviceGate()
    url = f"{threaded_server.url}/v1/embeddings"
    gone = 2001
    post = lambda body: requests.post(url, json=body, timeout=WAIT_S)  # noqa: E731
    with device_held(batcher, gate, post, marker=2002, workers=2) as (_, held, second):
        body = json.dumps({"input": [ids(gone, gone)] * 3}).encode()
        port = port_of(threaded_server.url)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_until(lambda: batcher.queued_inputs == 3, "the leaving client's inputs queued")
        # The socket is closed: the server cancels the request and its queued inputs.
        wait_until(lambda: state.admission.in_flight == 2, "the server dropped the request")
        gate.released.set()
        assert held.result(timeout=WAIT_S).status_code == 200
        assert second.result(timeout=WAIT_S).status_code == 200
    wait_until(lambda: batcher.queued_inputs == 0, "the cancelled inputs were skipped")
    assert gate.saw(2002) and gate.saw(2003)
    assert not gate.saw(gone), "inputs of a client that left reached the device"
    assert len(gate.batches) == 2
    metrics = scrape(threaded_server.url)
    assert sample(metrics, "toolkit_requests_total", route="/v1/embeddings", status="499") >= 1


# --- device faults ------------------------------------------------------------------------------


def out_of_memory_above(inputs: int) -> Callable[[PackedBatch], BaseException | None]:
    return lambda batch: torch.OutOfMemoryError("forced") if batch.real_seqs > inputs else None


def test_out_of_memory_splits_the_batch_and_every_request_succeeds(minilm_client) -> None:
    texts = [f"input number {i} " + "word " * i for i in range(8)]
    reference = minilm_client.post("/v1/embeddings", json={"input": texts}).json()["data"]
    gate = DeviceGate(hold=0, fault=out_of_memory_above(2))
    minilm_client.state.service.queue.runner.fault_hook = gate
    try:
        response = minilm_client.post("/v1/embeddings", json={"input": texts})
    finally:
        minilm_client.state.service.queue.runner.fault_hook = None
    assert response.status_code == 200, response.text
    got = np.array([d["embedding"] for d in response.json()["data"]])
    np.testing.assert_allclose(got, np.array([d["embedding"] for d in reference]), atol=1e-5)
    assert gate.sizes == [8, 4, 2, 2, 4, 2, 2]  # halved until the batches fit
    assert minilm_client.get("/health").status_code == 200


def test_an_input_that_still_fails_gets_500_and_its_batch_mates_succeed(fresh_client) -> None:
    batcher = fresh_client.state.service.queue
    poison = 3001
    gate = DeviceGate(
        fault=lambda batch: torch.OutOfMemoryError("forced") if poison in batch.input_ids else None
    )
    post = lambda body: fresh_client.post("/v1/embeddings", json=body)  # noqa: E731
    with device_held(batcher, gate, post, marker=3002, workers=4) as (pool, held, second):
        failing = pool.submit(post, {"input": [ids(3004), ids(poison)]})
        mate = pool.submit(post, {"input": [ids(3005)]})
        wait_until(lambda: batcher.queued_inputs == 3, "both requests queued together")
        gate.released.set()
        results = {
            name: f.result(timeout=WAIT_S) for name, f in [("held", held), ("second", second), ("mate", mate)]
        }
        failed = failing.result(timeout=WAIT_S)
    assert any(3004 in b and 3005 in b and poison in b for b in gate.batches), "not one batch"
    error = assert_openai_error(failed, 500)
    assert error["type"] == "server_error" and "log" in error["message"]
    assert all(r.status_code == 200 for r in results.values()), {k: r.text for k, r in results.items()}
    assert fresh_client.get("/health").status_code == 200
    assert post({"input": "alive"}).status_code == 200


def test_dead_device_thread_fails_in_flight_requests_fast_and_health_turns_503(fresh_client) -> None:
    batcher = fresh_client.state.service.queue
    gate = DeviceGate(fault=lambda batch: SystemExit("device thread died"))
    post = lambda body: fresh_client.post("/v1/embeddings", json=body)  # noqa: E731
    with device_held(batcher, gate, post, marker=4001, workers=3) as (pool, held, second):
        queued = pool.submit(post, {"input": [ids(4003)]})
        wait_until(lambda: batcher.queued_inputs == 1, "the third request queued")
        started = time.monotonic()
        gate.released.set()
        results = [held.result(timeout=WAIT_S), second.result(timeout=WAIT_S), queued.result(timeout=WAIT_S)]
        failed_within = time.monotonic() - started
    for result in results:
        assert assert_openai_error(result, 503)["code"] == "service_unavailable"
    assert failed_within < 5
    assert_openai_error(fresh_client.get("/health"), 503)
    started = time.monotonic()
    assert_openai_error(post({"input": "anyone there?"}), 503)
    assert time.monotonic() - started < 1
    assert "toolkit_ready 0.0" in fresh_client.get("/metrics").text


def test_dead_batcher_loop_fails_queued_requests_and_health_turns_503(fresh_client) -> None:
    batcher = fresh_client.state.service.queue

    def broken() -> None:
        raise RuntimeError("the batcher loop broke")

    batcher._take_batch = broken
    response = fresh_client.post("/v1/embeddings", json={"input": "hi"})
    assert assert_openai_error(response, 503)["code"] == "service_unavailable"
    assert_openai_error(fresh_client.get("/health"), 503)


def test_draining_serves_old_connections_with_close_and_refuses_new_ones(fresh_client) -> None:
    admission = fresh_client.state.admission
    admission.begin_drain([("old-client", 1234)])
    refused = fresh_client.post("/v1/embeddings", json={"input": "hi"})  # TestClient is a new peer
    assert assert_openai_error(refused, 503)["code"] == "shutting_down"
    assert refused.headers["connection"] == "close" and refused.headers["retry-after"] == "1"
    assert assert_openai_error(fresh_client.get("/health"), 503)["code"] == "shutting_down"
    assert fresh_client.get("/v1/models").headers["connection"] == "close"
    admission.begin_drain([("testclient", 50000)])  # the TestClient's peer address
    served = fresh_client.post("/v1/embeddings", json={"input": "hi"})
    assert served.status_code == 200 and served.headers["connection"] == "close"


# --- SIGTERM, for real --------------------------------------------------------------------------


@dataclass
class Outcome:
    sent: float
    finished: float
    status: int | str
    code: str | None = None


@pytest.mark.subprocess
def test_sigterm_under_load_finishes_accepted_requests_exits_zero_and_leaves_nothing(capsys) -> None:
    process, port = launch_server_cmd("python3 -m toolkit.launch_server --drain-timeout 20", host="127.0.0.1")
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    body = {"input": [f"request text {i}: " + "many words in a row " * 8 for i in range(16)]}
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = session.post(url, json=body, timeout=60)
                except requests.ConnectionError as exc:
                    outcomes.append(Outcome(sent, time.monotonic(), type(exc).__name__))
                    return
                code = None if response.status_code == 200 else response.json()["error"]["code"]
                outcomes.append(Outcome(sent, time.monotonic(), response.status_code, code))
                if response.status_code != 200:
                    return

    threads = [threading.Thread(target=client) for _ in range(16)]
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=180, process=process)
        tree = psutil.Process(process.pid).children(recursive=True)
        for thread in threads:
            thread.start()
        wait_until(lambda: len(outcomes) >= 16, "the load got going", timeout=120)
        signalled = time.monotonic()
        stop.set()
        process.send_signal(signal.SIGTERM)
        newcomer = fresh_connection_post(url, body)  # while the drain runs
        terminate_process(process, timeout=30)  # SIGTERM again (ignored) to the group, then waits
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        terminate_process(process)
    log = capsys.readouterr().out
    assert process.returncode == 0, log[-3000:]
    assert "Received SIGTERM" in log and "Traceback" not in log
    # Every request sent before the signal is answered, even those the server had not read yet:
    # their connections were open before the signal.
    before = [o for o in outcomes if o.sent < signalled]
    assert all(o.status == 200 for o in before), [o for o in before if o.status != 200]
    assert any(o.finished > signalled for o in before), "nothing was in flight at the signal"
    assert newcomer in {(503, "shutting_down"), ("ConnectionError", None)}, newcomer
    after = [o for o in outcomes if o.sent >= signalled]
    assert all(o.status == 200 or o.code == "shutting_down" or isinstance(o.status, str) for o in after)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def fresh_connection_post(url: str, body: dict[str, Any]) -> tuple[int | str, str | None]:
    try:
        response = requests.post(url, json=body, timeout=60)
    except requests.ConnectionError:
        return "ConnectionError", None
    return response.status_code, None if response.status_code == 200 else response.json()["error"]["code"]
