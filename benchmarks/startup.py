"""Seconds from launching a process to its first embedding: our server vs sentence-transformers.

    python benchmarks/startup.py [--runs 3]

Ours: `python -m toolkit.launch_server` on the bundled model, polled with a real embedding
request every 20 ms. The peer: a fresh Python process that imports sentence-transformers,
loads the same model and encodes one text. Both are medians over --runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import requests

PEER = (
    "from sentence_transformers import SentenceTransformer\n"
    "from toolkit.service.model_source import bundled_model_dir\n"
    "SentenceTransformer(str(bundled_model_dir()), device='cpu').encode('hello')\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ours_once() -> float:
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "toolkit.launch_server", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                response = requests.post(
                    f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "hello"}, timeout=5
                )
                if response.status_code == 200:
                    return time.perf_counter() - started
            except requests.ConnectionError:
                pass
            if process.poll() is not None:
                raise RuntimeError("server exited during start-up")
            time.sleep(0.02)
    finally:
        process.terminate()
        process.wait()


def peer_once() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PEER], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    ours = [ours_once() for _ in range(args.runs)]
    peer = [peer_once() for _ in range(args.runs)]
    print(f"toolkit server, launch -> first embedding: median {statistics.median(ours):.2f} s  {ours}")
    print(f"sentence-transformers, start -> first embedding: median {statistics.median(peer):.2f} s  {peer}")
    print(f"ratio: {statistics.median(peer) / statistics.median(ours):.2f}x faster")


if __name__ == "__main__":
    main()
