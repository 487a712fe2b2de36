"""Starting and stopping as a new user meets them: a taken port or a missing device is one clear
line before anything loads, and a server launched from Python never outlives that process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest
import requests

from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.subprocess


def _launch(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "toolkit.launch_server", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_taken_port_is_one_clear_line_naming_its_holder_and_exit_1(workers: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = _launch("--http-workers", workers, "--port", str(port))
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if "error" in line]
    assert len(errors) == 1, result.stdout
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in errors[0]
    assert f"held by pid {os.getpid()}" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert "Load weight" not in result.stdout  # nothing was loaded


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="this machine has the CUDA device the test asks for"
)
@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_missing_cuda_device_is_one_clear_line_and_exit_1(workers: str) -> None:
    result = _launch("--device", "cuda", "--http-workers", workers, "--port", "0")
    assert result.returncode == 1
    assert "--device cuda was asked for, but torch" in result.stdout
    assert "sees no CUDA device" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# A stand-in for a notebook kernel: it launches the bundled server, waits until it embeds, prints
# the server's pid, then either lingers (to be killed) or returns (exiting the interpreter).
_KERNEL = textwrap.dedent(
    """
    import sys, time
    from toolkit.utils import launch_server_cmd, wait_for_server
    process, port = launch_server_cmd("python3 -m toolkit.launch_server")
    wait_for_server(f"http://127.0.0.1:{port}", timeout=180, process=process)
    print("SERVER", process.pid, flush=True)
    if sys.argv[1] == "linger":
        time.sleep(600)
    """
)


def _kernel(how: str) -> tuple[subprocess.Popen[str], psutil.Process]:
    kernel = subprocess.Popen(
        [sys.executable, "-c", _KERNEL, how], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert kernel.stdout is not None
    for line in kernel.stdout:
        if line.startswith("SERVER "):
            return kernel, psutil.Process(int(line.split()[1]))
    kernel.communicate()
    raise AssertionError(f"the kernel exited with {kernel.returncode} before its server was ready")


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_server_stops_when_the_kernel_that_launched_it_is_killed() -> None:
    kernel, server = _kernel("linger")
    try:
        os.kill(kernel.pid, signal.SIGKILL)
        kernel.communicate(timeout=30)
        wait_until(lambda: _gone(server), "the orphaned server stopped", timeout=60)
    finally:
        if not _gone(server):
            server.kill()


def test_a_server_stops_when_the_kernel_exits_without_stopping_it() -> None:
    kernel, server = _kernel("exit")
    try:
        kernel.communicate(timeout=60)
        assert kernel.returncode == 0
        assert _gone(server)  # stopped at interpreter exit, before the kernel returned
    finally:
        if not _gone(server):
            server.kill()


def _logged_server() -> tuple[subprocess.Popen[str], int, list[str], threading.Thread]:
    """A server on a free port, its output (stdout and stderr) collected line by line."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "toolkit.launch_server", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout or []), daemon=True)
    reader.start()
    return server, port, lines, reader


def test_a_second_ctrl_c_stops_at_once_in_one_line_and_exits_non_zero() -> None:
    """The first Ctrl+C drains; a second one cuts the request in flight and ends the process,
    without a traceback or a 500 (a batch finishing for a cancelled request was one)."""
    server, port, lines, reader = _logged_server()
    url = f"http://127.0.0.1:{port}"
    answer: dict[str, object] = {}

    def long_request() -> None:
        try:
            body = {"input": ["word " * 200] * 1400}
            answer["status"] = requests.post(f"{url}/v1/embeddings", json=body, timeout=120).status_code
        except requests.ConnectionError as exc:
            answer["error"] = exc

    try:
        wait_until(lambda: any("Ready:" in line for line in lines), "the server is ready", 120)
        client = threading.Thread(target=long_request)
        client.start()
        wait_until(lambda: _in_flight(url) == 1, "the long request is in flight")
        server.send_signal(signal.SIGINT)
        wait_until(lambda: any("Received SIGINT" in line for line in lines), "the drain began")
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 130
        client.join(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        reader.join(10)
        assert server.stdout is not None
        server.stdout.close()
    output = "".join(lines)
    assert "error" in answer, answer  # the connection was cut, not answered with a 500
    assert output.count("Interrupted again: stopping now") == 1
    assert "Traceback" not in output


def _in_flight(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("toolkit_requests_in_flight "):
            return float(line.split()[-1])
    return 0.0


def test_the_default_log_is_short_lines_and_one_per_request() -> None:
    """At the default level: a start line, a loaded line, a ready line, one access line per
    request; no settings dump, no batch lines, no uvicorn chatter."""
    server, port, lines, reader = _logged_server()
    try:
        wait_until(lambda: any("Ready:" in line for line in lines), "the server is ready", 120)
        for _ in range(3):
            requests.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["a", "b"]}, timeout=30)
        wait_until(lambda: sum("method=POST" in line for line in lines) == 3, "three access lines")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        reader.join(10)
        assert server.stdout is not None
        server.stdout.close()
    before_ready = lines[: next(i for i, line in enumerate(lines) if "Ready:" in line) + 1]
    assert len(before_ready) == 3, before_ready  # starting, loaded, ready
    assert all(len(line) <= 200 for line in lines), max(lines, key=len)
    text = "".join(lines)
    for chatter in ("server_args=", "Batch.", "Application startup", "Started server process"):
        assert chatter not in text
