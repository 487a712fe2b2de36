"""`--dp-size N`: N engine processes behind the front ends, here on the CPU (sharing its cores).
Both engines take work and give sentence-transformers' vectors; one that dies fails only its own
requests while the other serves; SIGTERM drains and leaves no process behind."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psutil
import pytest
import requests

from tests.helpers.waiting import wait_until
from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

pytestmark = pytest.mark.subprocess

TEXTS = [f"Text {i}: a sentence for an engine to embed." for i in range(16)]


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    family: list[psutil.Process] = field(default_factory=list)

    def engines(self) -> list[psutil.Process]:
        children = psutil.Process(self.process.pid).children()
        return [child for child in children if "toolkit.process.dp_engine" in child.cmdline()]

    def metric(self, name: str) -> float:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.fixture
def server() -> Iterator[Server]:
    process, port = launch_server_cmd("python3 -m toolkit.launch_server --dp-size 2", host="127.0.0.1")
    served = Server(process, f"http://127.0.0.1:{port}")
    try:
        wait_for_server(served.url, timeout=180, process=process)
        served.family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        yield served
    finally:
        terminate_process(process)
    _, alive = psutil.wait_procs(served.family, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "a process outlived the server"


def _embed(url: str, texts: list[str]) -> np.ndarray:
    response = requests.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=60)
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def test_two_engines_share_the_work_and_embed_like_sentence_transformers(
    server: Server, minilm_dir, capfd: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)
    assert len(server.engines()) == 2 and server.metric("toolkit_engines_alive") == 2
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _embed(server.url, TEXTS), range(32)))
    for vectors in answers:
        norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
        assert ((vectors * reference).sum(1) / norms).min() >= 0.99999
        assert np.abs(vectors - reference).max() <= 1e-5
    terminate_process(server.process)  # each engine prints what it served as it stops
    assert server.process.returncode == 0
    log = capfd.readouterr().out
    served = {
        index: int(line.split("Served ")[1].split()[0])
        for index in (0, 1)
        for line in log.splitlines()
        if f" engine {index}]" in line and "Served " in line
    }
    assert served.keys() == {0, 1} and min(served.values()) > 0, served


def test_a_dead_engine_fails_only_its_requests_and_the_other_serves(server: Server) -> None:
    stop = threading.Event()
    statuses: list[int | str] = []

    def load() -> None:
        while not stop.is_set():
            try:
                statuses.append(
                    requests.post(
                        f"{server.url}/v1/embeddings", json={"input": TEXTS}, timeout=30
                    ).status_code
                )
            except requests.RequestException as exc:
                statuses.append(type(exc).__name__)

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        wait_until(lambda: len(statuses) >= 8, "requests under way")
        server.engines()[0].kill()
        wait_until(lambda: server.metric("toolkit_engines_alive") == 1, "the front ends saw it")
        after = len(statuses)
        wait_until(lambda: len(statuses) >= after + 8, "requests after the loss")
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    assert all(not client.is_alive() for client in clients), "a request hung"
    assert set(statuses) <= {200, 503}, set(statuses)  # the lost engine's requests: 503, at once
    assert statuses[after:].count(200) >= 8
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
