"""The notebook helpers against real subprocesses (tests/helpers/fake_server.py), no model needed."""

from __future__ import annotations

import io
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests

from toolkit import utils
from toolkit.utils import launch_server_cmd, print_highlight, terminate_process, wait_for_server

pytestmark = pytest.mark.subprocess

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_SERVER = str(Path(__file__).resolve().parent / "helpers" / "fake_server.py")
FAKE = f"python3 {shlex.quote(FAKE_SERVER)} --host 127.0.0.1"
# Generous bounds: they only catch a helper that waits for its timeout instead of failing fast.
LONG_TIMEOUT = 60.0
FAST = 20.0

Launcher = Callable[..., tuple[subprocess.Popen[str], int]]


@pytest.fixture
def launch() -> Iterator[Launcher]:
    """launch_server_cmd, with every process it started terminated after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(command: str, **kwargs: object) -> tuple[subprocess.Popen[str], int]:
        process, port = launch_server_cmd(command, **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process, port

    yield start
    for process in started:
        terminate_process(process, timeout=5)


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def port_is_bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def wait_for_output(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Captured stdout once it contains every needle (the log reader is a thread)."""
    seen = ""
    deadline = time.monotonic() + FAST
    while not all(needle in seen for needle in needles):
        assert time.monotonic() < deadline, f"never saw {needles!r} in:\n{seen}"
        time.sleep(0.02)
        seen += capsys.readouterr().out
    return seen


def is_gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_port_is_chosen_served_and_freed(launch: Launcher) -> None:
    process, port = launch(FAKE)
    assert 0 < port < 65536
    wait_for_server(url(port), timeout=LONG_TIMEOUT, process=process)
    response = requests.get(f"{url(port)}/v1/models", timeout=5)
    assert response.json()["data"][0]["id"] == "fake-model"

    terminate_process(process)
    assert process.returncode is not None
    assert port_is_bindable(port)


def test_quoting_env_prefix_and_interpreter(launch: Launcher, capsys: pytest.CaptureFixture[str]) -> None:
    _, port = launch(f"GREETING='hello world' {FAKE} --model 'my model' --echo-env GREETING")
    wait_for_server(url(port), timeout=LONG_TIMEOUT)
    wait_for_output(
        capsys,
        '"--model", "my model"',
        "env GREETING=hello world",
        f"python {sys.executable}",
        "bound 127.0.0.1",
    )
    assert "GREETING" not in os.environ
    response = requests.get(f"{url(port)}/v1/models", timeout=5)
    assert response.json()["data"][0]["id"] == "my model"


def test_backslash_newline_continuation(launch: Launcher) -> None:
    command = rf"""FIRST=1 \
        python3 {shlex.quote(FAKE_SERVER)} \
            --host 127.0.0.1 \
            --model "multi line" \
            --echo-env FIRST"""
    process, port = launch(command)
    wait_for_server(url(port), timeout=LONG_TIMEOUT, process=process)
    response = requests.get(f"{url(port)}/v1/models", timeout=5)
    assert response.json()["data"][0]["id"] == "multi line"


def test_port_inside_command_is_refused() -> None:
    with pytest.raises(ValueError, match="port="):
        launch_server_cmd(f"{FAKE} --port 8000")


def test_toolkit_server_inherits_the_held_port(
    launch: Launcher, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(utils, "LISTEN_FD_SERVERS", (*utils.LISTEN_FD_SERVERS, FAKE_SERVER))
    process, port = launch(FAKE)
    # The socket listens from the moment launch returns, before the child has even started
    # Python: nobody else can take the port, and early clients wait instead of being refused.
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    wait_for_server(url(port), timeout=LONG_TIMEOUT, process=process)
    wait_for_output(capsys, "serving on inherited socket fd", f"port {port}")
    terminate_process(process)
    assert port_is_bindable(port)


@pytest.mark.parametrize(
    ("host", "bound", "appended"), [(None, "127.0.0.1", False), ("0.0.0.0", "0.0.0.0", True)]
)
def test_the_server_listens_where_its_log_says(
    launch: Launcher,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    host: str | None,
    bound: str,
    appended: bool,
) -> None:
    """No --host in the command: loopback, as the server's own default says, unless the caller
    asks for another host, which the server is then told too."""
    monkeypatch.setattr(utils, "LISTEN_FD_SERVERS", (*utils.LISTEN_FD_SERVERS, FAKE_SERVER))
    process, port = launch_server_cmd(f"python3 {shlex.quote(FAKE_SERVER)}", host=host)
    try:
        wait_for_server(url(port), timeout=LONG_TIMEOUT, process=process)
        listening = [
            c.laddr.ip
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert listening == [bound]
        output = wait_for_output(capsys, "args ")
        assert ('"--host", "0.0.0.0"' in output) is appended
    finally:
        terminate_process(process)


def test_dead_server_fails_fast_with_its_log(launch: Launcher) -> None:
    _, port = launch(f"{FAKE} --startup-delay 600 --die-after 0.3")
    started = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        wait_for_server(url(port), timeout=LONG_TIMEOUT)
    assert time.monotonic() - started < FAST
    message = str(raised.value)
    assert "exited with code 3" in message
    assert message.rstrip().endswith("fake server: exiting with code 3")


def test_command_that_never_serves_fails_fast_even_without_timeout(launch: Launcher) -> None:
    _, port = launch("python3 -c \"print('no server here'); raise SystemExit(2)\"")
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            wait_for_server(url(port), timeout=None)
        except RuntimeError as exc:
            errors.append(exc)

    # A thread, so that a regression fails this test instead of hanging the suite.
    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(FAST)
    assert not waiter.is_alive()
    assert "exited with code 2" in str(errors[0])
    assert "no server here" in str(errors[0])


def test_explicit_port(launch: Launcher) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        wanted = sock.getsockname()[1]
    process, port = launch(FAKE, port=wanted)
    assert port == wanted
    wait_for_server(url(port), timeout=LONG_TIMEOUT, process=process)


def test_timeout_while_warming_up(launch: Launcher) -> None:
    process, port = launch(f"{FAKE} --startup-delay 600")
    with pytest.raises(TimeoutError, match="503"):
        wait_for_server(url(port), timeout=0.5, process=process)
    assert process.poll() is None


def test_timeout_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TimeoutError, match=r"not ready after 0\.3 s"):
        wait_for_server(url(port), timeout=0.3)


def test_api_key(launch: Launcher) -> None:
    _, port = launch(f"{FAKE} --api-key secret")
    wait_for_server(url(port), timeout=LONG_TIMEOUT, api_key="secret")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="rejected the api key"):
        wait_for_server(url(port), timeout=LONG_TIMEOUT, api_key="wrong")
    with pytest.raises(RuntimeError, match="needs an api key"):
        wait_for_server(url(port), timeout=LONG_TIMEOUT)
    assert time.monotonic() - started < FAST


def test_waits_for_embeddings_not_just_http(launch: Launcher, capsys: pytest.CaptureFixture[str]) -> None:
    process, port = launch(f"{FAKE} --startup-delay 1")
    wait_for_server(url(port), timeout=LONG_TIMEOUT, process=process)
    response = requests.post(
        f"{url(port)}/v1/embeddings", json={"model": "fake-model", "input": "x"}, timeout=5
    )
    assert response.status_code == 200
    output = wait_for_output(capsys, '"POST /v1/embeddings HTTP/1.1" 503', "Server is ready.")
    assert output.count("Server is ready.") == 1


def test_terminate_kills_the_tree_and_is_idempotent(launch: Launcher) -> None:
    process, port = launch(f"{FAKE} --spawn-child")
    wait_for_server(url(port), timeout=LONG_TIMEOUT, process=process)
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert descendants

    terminate_process(process)
    assert process.returncode == -signal.SIGTERM
    assert all(is_gone(p) for p in descendants)
    terminate_process(process)


def test_terminate_after_death_kills_orphans(launch: Launcher) -> None:
    process, port = launch(f"{FAKE} --spawn-child --die-after 1")
    wait_for_server(url(port), timeout=LONG_TIMEOUT, process=process)
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert process.wait(timeout=FAST) == 3
    assert not any(is_gone(p) for p in descendants)

    terminate_process(process)
    assert all(is_gone(p) for p in descendants)
    assert port_is_bindable(port)


def test_terminate_escalates_to_sigkill(launch: Launcher) -> None:
    process, port = launch(f"{FAKE} --ignore-sigterm")
    wait_for_server(url(port), timeout=LONG_TIMEOUT, process=process)
    terminate_process(process, timeout=0.5)
    assert process.returncode == -signal.SIGKILL
    assert port_is_bindable(port)


def test_terminate_plain_popen() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    terminate_process(process)
    assert process.returncode == -signal.SIGTERM
    terminate_process(process)


def test_import_stays_light() -> None:
    heavy = ["torch", "fastapi", "uvicorn", "transformers", "numpy", "IPython"]
    code = f"import sys, toolkit.utils; print([m for m in {heavy!r} if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_print_highlight_plain(capsys: pytest.CaptureFixture[str]) -> None:
    print_highlight("ready <now>")
    print_highlight(42)
    assert capsys.readouterr().out == "ready <now>\n42\n"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_print_highlight_terminal_colors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    colored = FakeTty()
    monkeypatch.setattr(sys, "stdout", colored)
    print_highlight("ready")
    assert colored.getvalue() == "\x1b[1;34mready\x1b[0m\n"

    monkeypatch.setenv("NO_COLOR", "1")
    plain = FakeTty()
    monkeypatch.setattr(sys, "stdout", plain)
    print_highlight("ready")
    assert plain.getvalue() == "ready\n"


def test_print_highlight_in_jupyter(monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[str] = []
    shell_type = type("ZMQInteractiveShell", (), {})
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = shell_type  # type: ignore[attr-defined]
    display = types.ModuleType("IPython.display")
    display.HTML = str  # type: ignore[attr-defined]
    display.display = shown.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)

    print_highlight("a < b\nok")
    assert shown == ['<strong style="color: #00008B;">a &lt; b<br>ok</strong>']
