"""Notebook helpers: start an embedding server, wait until it answers, stop it cleanly.

Used from a notebook the way ``sglang.utils`` is::

    process, port = launch_server_cmd("python3 -m toolkit.launch_server --model-path M")
    wait_for_server(f"http://localhost:{port}", timeout=300)
    ...
    terminate_process(process)

This module runs in the user's kernel, so it imports only the standard library, ``requests`` and
``psutil`` (and IPython's display, only when IPython is already loaded): the heavy server stack
lives in the child process.

Port hand-off contract with the server (``toolkit.process.bootstrap``): for a command that is a toolkit
server, the parent binds and listens on the port itself and the child inherits that listening
socket; its file descriptor number is in the environment variable named by ``LISTEN_FD_ENV``.
A server that finds the variable must serve on that socket (``socket.socket(fileno=fd)``) instead
of binding ``--host``/``--port`` again, mark it non-inheritable and drop the variable from its
environment so its own subprocesses never see it. The port is then never free between choosing it
and serving on it, and early clients queue in the socket's backlog instead of being refused.
"""

from __future__ import annotations

import atexit
import html
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

import psutil
import requests

# The server reads the inherited listening socket's descriptor number from this variable.
from toolkit.environment import LISTEN_FD_ENV, PARENT_ENV
from toolkit.process_tree import bound_socket, owned_group, stop_tree, wait_port_free
from toolkit.readiness import probe

LISTEN_FD_SERVERS: tuple[str, ...] = ("toolkit.launch_server",)
"""Command-line words that mark a command as a server honouring ``LISTEN_FD_ENV``.

A command gets the inherited socket when one of its argv words equals one of these (as in
``python3 -m toolkit.launch_server``). Tests add their fake server's path here.
"""

_PYTHON_NAMES = frozenset({"python", "python3"})
_ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_LINE_CONTINUATION = re.compile(r"\\\r?\n")
_LOG_LINES_KEPT = 200
_LOG_LINES_SHOWN = 30
_POLL_FIRST_S = 0.05
_POLL_MAX_S = 0.5
_READER_CATCH_UP_S = 1.0
_KILL_WAIT_S = 5.0


@dataclass(eq=False)
class _Launch:
    """What launch_server_cmd remembers about a process it started."""

    process: subprocess.Popen[str]
    host: str
    port: int
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=_LOG_LINES_KEPT))
    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None
    stop_at_exit: bool = True

    def tail(self, count: int) -> list[str]:
        with self.lock:
            return list(self.lines)[-count:]


# Keyed by pid; an entry is dropped once terminate_process has stopped its process.
_LAUNCHES: dict[int, _Launch] = {}


def launch_server_cmd(
    command: str, host: str | None = None, port: int | None = None, stop_with_parent: bool = True
) -> tuple[subprocess.Popen[str], int]:
    """Start a server command in the background and return ``(process, port)``.

    The command is split like a shell would: quotes are honoured, backslash-newline continues a
    line, and leading ``KEY=VALUE`` words set environment variables for the child only. A leading
    ``python``/``python3`` becomes this interpreter, so the notebook's environment runs the server.
    ``--port`` is appended (a free port unless ``port`` is given). The server listens where the
    command's own ``--host`` says, else on ``host`` (then appended as ``--host``), else on
    127.0.0.1, the server's own default.

    The child runs in its own session (so terminate_process can stop its whole tree), its output
    is streamed to this process's stdout line by line, and its last lines are kept for error
    messages from wait_for_server. With ``stop_with_parent`` (the default) a toolkit server stops
    by itself once this Python process is gone, even if it was killed, and every server still
    running is stopped when this interpreter exits.
    """
    env_updates, argv = _split_command(command)
    if any(word == "--port" or word.startswith("--port=") for word in argv):
        raise ValueError("pass the port as launch_server_cmd(..., port=N), not inside the command")
    if argv[0] in _PYTHON_NAMES:
        argv[0] = sys.executable
    bind_host = _option_value(argv, "--host")
    if bind_host is None and host is not None:
        argv += ["--host", host]
    bind_host = bind_host or host or "127.0.0.1"
    listener = _reserve_port(bind_host, port or 0)
    chosen_port: int = listener.getsockname()[1]
    argv += ["--port", str(chosen_port)]
    if stop_with_parent:
        env_updates = {PARENT_ENV: _this_process(), **env_updates}
    try:
        process = _start_child(argv, env_updates, listener)
    finally:
        listener.close()
    launch = _Launch(process=process, host=bind_host, port=chosen_port, stop_at_exit=stop_with_parent)
    assert process.stdout is not None
    launch.reader = threading.Thread(
        target=_pump_log,
        args=(process.stdout, launch),
        name=f"toolkit-server-log-{process.pid}",
        daemon=True,
    )
    launch.reader.start()
    _LAUNCHES[process.pid] = launch
    return process, chosen_port


def wait_for_server(
    base_url: str,
    timeout: float | None = None,
    api_key: str | None = None,
    process: subprocess.Popen[Any] | None = None,
) -> None:
    """Block until the server at ``base_url`` answers an embedding request.

    Readiness means ``GET /v1/models`` names a model and ``POST /v1/embeddings`` for it returns
    200, so a server that is up but still loading or warming up is not ready yet. ``api_key`` is
    sent as a bearer token. ``process`` defaults to the process launch_server_cmd started on the
    URL's port, if any.

    Raises:
        RuntimeError: the process exited (the message has its exit status and last log lines),
            or the server refused the api key.
        TimeoutError: not ready after ``timeout`` seconds (``None`` waits indefinitely).
    """
    base_url = base_url.rstrip("/")
    launch = _launch_of(process) if process is not None else _launch_on_port(base_url)
    if process is None and launch is not None:
        process = launch.process
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = _POLL_FIRST_S
    last_problem = "no answer yet"
    with requests.Session() as session:
        if api_key:
            session.headers["Authorization"] = f"Bearer {api_key}"
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(_exit_report(process, launch))
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"Server at {base_url} was not ready after {timeout:g} s "
                    f"(last: {last_problem}).{_log_excerpt(launch)}"
                )
            problem = probe(session, base_url, remaining, api_key is not None)
            if problem is None:
                print_highlight("Server is ready.")
                return
            last_problem = problem
            time.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX_S)


def print_highlight(obj: object) -> None:
    """Print ``obj`` so it stands out: bold blue HTML in Jupyter, bold ANSI on a terminal."""
    text = str(obj)
    if _in_jupyter():
        from IPython.display import HTML, display

        body = html.escape(text).replace("\n", "<br>")
        display(HTML(f'<strong style="color: #00008B;">{body}</strong>'))
    elif _stdout_wants_color():
        print(f"\x1b[1;34m{text}\x1b[0m", flush=True)
    else:
        print(text, flush=True)


def terminate_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop ``process`` and everything it started, then wait until its port is free again.

    Descendants are collected first (they are re-parented once their parent dies), then the
    process group and every descendant get SIGTERM; what is still alive after ``timeout``
    seconds gets SIGKILL. The process is reaped, its log reader finishes, and for a server from
    launch_server_cmd the call returns once its port can be bound again (again bounded by
    ``timeout``; TimeoutError otherwise). Calling it again, or on an exited process, is harmless.
    """
    launch = _launch_of(process)
    stop_tree(process, owned_group(process, launch is not None), timeout)
    if launch is None:
        return
    if launch.reader is not None:
        launch.reader.join(timeout=_KILL_WAIT_S)
    wait_port_free(launch.host, launch.port, timeout)
    _LAUNCHES.pop(process.pid, None)


# --- launching ------------------------------------------------------------------------------


def _this_process() -> str:
    """This process as a launched server watches it: "PID:START_TIME" (a reused pid differs)."""
    return f"{os.getpid()}:{psutil.Process().create_time()}"


@atexit.register
def _stop_launched_servers() -> None:
    """At interpreter exit, stop every server this process launched and did not stop."""
    for launch in list(_LAUNCHES.values()):
        if launch.stop_at_exit and launch.process.poll() is None:
            stop_tree(launch.process, launch.process.pid, _KILL_WAIT_S)


def _start_child(
    argv: list[str], env_updates: dict[str, str], listener: socket.socket
) -> subprocess.Popen[str]:
    """Start argv in a session of its own, its output piped; a toolkit server inherits `listener`."""
    env = os.environ.copy()
    env.pop(LISTEN_FD_ENV, None)
    # Python children buffer a piped stdout in blocks; unbuffered, the log streams as it happens
    # and the last lines before a crash are not lost.
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(env_updates)
    pass_fds: tuple[int, ...] = ()
    if any(word in LISTEN_FD_SERVERS for word in argv):
        env[LISTEN_FD_ENV] = str(listener.fileno())
        pass_fds = (listener.fileno(),)
    else:
        # A foreign server binds the port itself: release it as late as possible.
        listener.close()
    return subprocess.Popen(
        argv,
        env=env,
        pass_fds=pass_fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )


def _split_command(command: str) -> tuple[dict[str, str], list[str]]:
    """Split a shell-style command into leading ``KEY=VALUE`` assignments and argv."""
    words = shlex.split(_LINE_CONTINUATION.sub("", command))
    env: dict[str, str] = {}
    while words and _ENV_ASSIGNMENT.match(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not words:
        raise ValueError(f"no command to run in {command!r}")
    return env, words


def _option_value(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in argv (``--opt V`` or ``--opt=V``), the last one winning."""
    value = None
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(option + "="):
            value = word[len(option) + 1 :]
    return value


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port), so nobody else can take the port."""
    try:
        sock = bound_socket(host, port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot reserve port {port} on {host}: {exc.strerror}") from exc
    sock.listen(socket.SOMAXCONN)
    return sock


def _pump_log(stream: IO[str], launch: _Launch) -> None:
    """Copy the child's output to our stdout and into the launch's ring buffer until EOF."""
    with stream:
        for line in stream:
            with launch.lock:
                launch.lines.append(line.rstrip("\r\n"))
            try:
                sys.stdout.write(line if line.endswith("\n") else line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                # Our stdout went away (closed capture, detached console): keep draining the pipe
                # so the child never blocks on a full pipe, and keep the ring buffer filling.
                pass


# --- waiting --------------------------------------------------------------------------------


def _exit_report(process: subprocess.Popen[Any], launch: _Launch | None) -> str:
    code = process.returncode
    status = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    if launch is not None and launch.reader is not None:
        # The reader may still hold the final lines; a surviving grandchild can keep the pipe
        # open, so this wait is bounded.
        launch.reader.join(timeout=_READER_CATCH_UP_S)
    return f"Server process {process.pid} {status} before it was ready.{_log_excerpt(launch)}"


def _log_excerpt(launch: _Launch | None) -> str:
    if launch is None:
        return ""
    lines = launch.tail(_LOG_LINES_SHOWN)
    if not lines:
        return "\nThe server printed nothing."
    return f"\nLast {len(lines)} log lines:\n" + "\n".join(lines)


def _launch_of(process: subprocess.Popen[Any] | None) -> _Launch | None:
    if process is None:
        return None
    launch = _LAUNCHES.get(process.pid)
    return launch if launch is not None and launch.process is process else None


def _launch_on_port(base_url: str) -> _Launch | None:
    """The most recent launch on the URL's port, so wait_for_server(url) can watch the process."""
    try:
        port = urlsplit(base_url).port
    except ValueError:
        return None
    matches = [launch for launch in _LAUNCHES.values() if launch.port == port]
    return matches[-1] if matches else None


# --- printing -------------------------------------------------------------------------------


def _in_jupyter() -> bool:
    # Only look at an IPython that is already loaded: importing it would cost the plain-Python
    # user a heavy import for nothing.
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _stdout_wants_color() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False
