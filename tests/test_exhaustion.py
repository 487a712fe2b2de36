"""Attacks that cost the attacker little, against a real server process: each must be refused or
cut off cheaply, while /health answers within 100 ms (p99) and a normal request within 10 times
its quiet latency, and afterwards the server's memory must be back within 100 MB."""

from __future__ import annotations

import json
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import pytest
import requests

from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

REQUEST_START = b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\n"
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

HEALTH_P99_S = 0.1
SLOWDOWN_ALLOWED = 10
RSS_KEPT_BYTES = 100 * 2**20


@dataclass
class Server:
    url: str
    port: int
    process: psutil.Process
    quiet_s: float = 0.0

    def rss(self) -> int:
        return int(self.process.memory_info().rss)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # Short header and body deadlines, so that the test need not wait out the defaults.
    command = "python3 -m toolkit.launch_server --header-timeout 2 --body-timeout 3"
    process, port = launch_server_cmd(command, host="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_server(url, timeout=180, process=process)
        served = Server(url, port, psutil.Process(process.pid))
        served.quiet_s = statistics.median(_timed_embedding(url) for _ in range(20))
        _settle(served)  # the background kernel build and the first trims are done
        yield served
    finally:
        terminate_process(process)


def _settle(server: Server, timeout: float = 60.0) -> None:
    """Wait until the server's memory stops moving: it builds kernels in the background after
    start-up, and gives memory back every 2 s once idle."""
    deadline, last = time.monotonic() + timeout, server.rss()
    while time.monotonic() < deadline:
        time.sleep(2.5)
        now = server.rss()
        if abs(now - last) < 4 * 2**20:
            return
        last = now
    raise TimeoutError("the server's memory never settled")


def _timed_embedding(url: str) -> float:
    started = time.perf_counter()
    response = requests.post(f"{url}/v1/embeddings", json={"input": "a normal short request"}, timeout=30)
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


@dataclass
class Probe:
    """Polls /health and a normal request while an attack runs."""

    url: str
    health_s: list[float] = field(default_factory=list)
    normal_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    status = session.get(f"{self.url}/health", timeout=5).status_code
                    self.health_s.append(time.perf_counter() - started)
                    if status != 200:
                        self.failures.append(f"/health {status}")
                    self.normal_s.append(_timed_embedding(self.url))
                except (requests.RequestException, AssertionError) as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.02)


@contextmanager
def watched(server: Server) -> Iterator[Probe]:
    """Run the block under a probe; then check the server stayed responsive and gave memory back."""
    before = server.rss()
    probe = Probe(server.url)
    thread = threading.Thread(target=probe.run, daemon=True)
    thread.start()
    try:
        yield probe
    finally:
        probe.stop.set()
        thread.join(30)
    assert probe.failures == [], probe.failures[:5]
    assert len(probe.health_s) >= 5, "the probe barely ran"
    p99 = sorted(probe.health_s)[int(0.99 * (len(probe.health_s) - 1))]
    assert p99 <= HEALTH_P99_S, f"/health p99 {p99 * 1000:.0f} ms during the attack"
    slowest_normal = statistics.median(probe.normal_s)
    assert slowest_normal <= SLOWDOWN_ALLOWED * max(server.quiet_s, 0.005), (slowest_normal, server.quiet_s)
    # Memory goes back once the server has been idle a moment (the heap is trimmed every 2 s).
    deadline = time.monotonic() + 15
    while server.rss() - before > RSS_KEPT_BYTES and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.rss() - before <= RSS_KEPT_BYTES, f"RSS grew by {(server.rss() - before) / 2**20:.0f} MB"


def repeatedly(attack: Callable[[], None], seconds: float = 2.0) -> int:
    """Run the attack again and again for `seconds`, so that the probe sees it under way."""
    deadline, rounds = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        attack()
        rounds += 1
    return rounds


def _refused(server: Server, body: bytes) -> None:
    response = requests.post(
        f"{server.url}/v1/embeddings", data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 400 and response.json()["error"]["message"], response.text[:300]


def test_a_million_nulls_are_refused_by_their_count(server: Server) -> None:
    body = json.dumps({"input": [None] * 1_000_000}).encode()
    with watched(server):
        repeatedly(lambda: _refused(server, body))


def test_a_million_token_ids_are_refused_by_their_length(server: Server) -> None:
    body = json.dumps({"input": [list(range(1000, 1010)) * 100_000]}).encode()
    with watched(server):
        repeatedly(lambda: _refused(server, body))


def test_ten_megabytes_of_text_are_refused_untokenized_or_cut_once(server: Server) -> None:
    text = "word " * (2 * 2**20)
    refused = json.dumps({"input": text}).encode()
    cut = json.dumps({"input": text, "truncate": True}).encode()

    def cut_once() -> None:
        response = requests.post(f"{server.url}/v1/embeddings", data=cut, timeout=60)
        assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 256

    with watched(server):
        repeatedly(lambda: _refused(server, refused))
        repeatedly(cut_once)


def _open(server: Server, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(count)]


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.0)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_connections_are_closed_and_do_not_starve_others(server: Server) -> None:
    with watched(server):
        idle = _open(server, 500)
        try:
            time.sleep(3.5)  # past the test server's header deadline of 2 s
            assert all(_closed_by_server(sock) for sock in idle)
        finally:
            for sock in idle:
                sock.close()


def test_slowloris_headers_are_cut_off(server: Server) -> None:
    with watched(server):
        slow = _open(server, 200)
        try:
            for sock in slow:
                sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\n")
            for _ in range(3):  # a header line now and then: each would reset an idle timer
                time.sleep(1)
                for sock in slow:
                    if not _closed_by_server(sock):
                        sock.sendall(b"X-Slow: 1\r\n")
            time.sleep(1)
            assert all(_closed_by_server(sock) for sock in slow)
        finally:
            for sock in slow:
                sock.close()


def test_a_body_that_never_finishes_is_cut_off(server: Server) -> None:
    with watched(server):
        sock = _open(server, 1)[0]
        try:
            sock.sendall(REQUEST_START + b'Content-Length: 1000\r\n\r\n{"input"')
            time.sleep(4.5)  # past the test server's body deadline of 3 s
            assert _closed_by_server(sock)
        finally:
            sock.close()


def test_a_stalled_body_does_not_hold_the_drain() -> None:
    """SIGTERM drains the requests in flight; a body still arriving is not one of them, so the
    server stops within its close grace, not after the 30 s drain timeout."""
    process, port = launch_server_cmd("python3 -m toolkit.launch_server", host="127.0.0.1")
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=180, process=process)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.5)  # the server has the headers and waits for the body
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        stalled.close()
    finally:
        terminate_process(process)


def test_a_frozen_engine_is_unhealthy_and_its_requests_time_out() -> None:
    """With --http-workers, a stopped engine process (SIGSTOP) sends no heartbeat: the front ends
    answer /health with 503 within seconds, requests end with 504 at --request-timeout, and all
    is well again once the engine runs."""
    process, port = launch_server_cmd(
        "python3 -m toolkit.launch_server --http-workers 2 --request-timeout 3", host="127.0.0.1"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout=180, process=process)
        process.send_signal(signal.SIGSTOP)
        try:
            # Sent at once, while the front ends still count on the engine: it waits, then times out.
            timed_out = requests.post(f"{url}/v1/embeddings", json={"input": "anyone there?"}, timeout=30)
            assert timed_out.status_code == 504, timed_out.text
            _wait_for_health(url, 503, within_s=15)
            refused = requests.post(f"{url}/v1/embeddings", json={"input": "and now?"}, timeout=30)
            assert refused.status_code == 503, refused.text  # at once: nothing is queued behind it
        finally:
            process.send_signal(signal.SIGCONT)
        _wait_for_health(url, 200, within_s=15)
        assert requests.post(f"{url}/v1/embeddings", json={"input": "back"}, timeout=30).status_code == 200
    finally:
        terminate_process(process)


def _wait_for_health(url: str, status: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while requests.get(f"{url}/health", timeout=5).status_code != status:
        assert time.monotonic() < deadline, f"/health never answered {status}"
        time.sleep(0.2)


def test_a_web_page_cannot_drive_the_server(server: Server) -> None:
    """DNS rebinding names another host; a cross-origin page posts text/plain without a preflight."""
    body = json.dumps({"input": "hi"})
    rebound = requests.post(f"{server.url}/v1/embeddings", data=body, headers={"Host": "rebound.example"})
    page = requests.post(
        f"{server.url}/v1/embeddings",
        data=body,
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
    )
    assert (rebound.status_code, page.status_code) == (403, 403)
    assert requests.post(f"{server.url}/v1/embeddings", data=body).status_code == 200  # curl -d
