"""The front-end processes of an engine process: started on the shared HTTP socket, replaced when
one exits while the server runs, and never left running after the engine.

Each front end reaches the engine over a socket pair of its own, inherited at start: nothing on
disk to leave behind, and nothing another local user could connect to.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from toolkit.environment import ENGINE_SOCKET_ENV, LISTEN_FD_ENV
from toolkit.server_args import ENV_PREFIX

API_KEY_ENV, API_KEY_FILE_ENV = f"{ENV_PREFIX}API_KEY", f"{ENV_PREFIX}API_KEY_FILE"

logger = logging.getLogger(__name__)

POLL_S = 0.2
KILL_GRACE_S = 5.0
# A front end that exits is replaced, up to this many times per front end within the window;
# past that they are failing for good (a bad flag, a broken install) and the server stops.
_RESTARTS_PER_WINDOW = 3
_RESTART_WINDOW_S = 60.0


class FrontEnds:
    def __init__(
        self, argv: Sequence[str], http_socket: socket.socket, count: int, api_key: str | None = None
    ) -> None:
        # The key goes by environment, not argv, which every user can read in the process list.
        self._argv = _without_api_key(argv)
        self._api_key = api_key
        # The engine keeps the listening socket (it never accepts on it) to start replacements.
        self._http_socket = http_socket
        # The engine's ends of the links, until `serve_links` hands them to the engine's server.
        self._new_links: list[socket.socket] = []
        self._serve_link: Callable[[socket.socket], None] | None = None
        self.processes = [self._start() for _ in range(count)]

    def serve_links(self, serve: Callable[[socket.socket], None]) -> None:
        """Hand every link to `serve`, those of front ends started later too."""
        self._serve_link = serve
        for link in self._new_links:
            serve(link)
        self._new_links.clear()

    def _start(self) -> subprocess.Popen[bytes]:
        engine_end, front_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (self._http_socket.fileno(), front_end.fileno())
        env = {**os.environ, LISTEN_FD_ENV: str(fds[0]), ENGINE_SOCKET_ENV: str(fds[1])}
        env.pop(API_KEY_FILE_ENV, None)
        if self._api_key is not None:
            env[API_KEY_ENV] = self._api_key
        command = [sys.executable, "-m", "toolkit.process.front_end", *self._argv]
        try:
            process = subprocess.Popen(command, env=env, pass_fds=fds)
        finally:
            front_end.close()
        if self._serve_link is None:
            self._new_links.append(engine_end)
        else:
            self._serve_link(engine_end)
        return process

    def close_unserved_links(self) -> None:
        """Front ends still waiting for their HELLO see the engine gone."""
        for link in self._new_links:
            link.close()
        self._new_links.clear()

    async def supervise(self, stopping: asyncio.Event) -> None:
        """Replace any front end that exits while the server is not stopping (a crash, an OOM
        kill); return, to stop the server, once replacements keep exiting too."""
        restarts: collections.deque[float] = collections.deque()
        while True:
            for index, process in enumerate(self.processes):
                code = process.poll()
                if code is None or stopping.is_set():
                    continue
                now = time.monotonic()
                while restarts and now - restarts[0] > _RESTART_WINDOW_S:
                    restarts.popleft()
                if len(restarts) >= _RESTARTS_PER_WINDOW * len(self.processes):
                    return
                restarts.append(now)
                self.processes[index] = self._start()
                logger.error(
                    "HTTP front end %d exited with code %d: started %d instead",
                    process.pid,
                    code,
                    self.processes[index].pid,
                )
            await asyncio.sleep(POLL_S)

    def signal_stop(self) -> None:
        """SIGTERM to each front end still running: each drains, then exits."""
        for process in self.processes:  # harmless if they got the signal already (a process group's)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    async def all_exited(self) -> None:
        while any(process.poll() is None for process in self.processes):
            await asyncio.sleep(POLL_S)

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()

    def stop(self) -> None:
        """Make sure no front end outlives the engine (after a failed start, say)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + KILL_GRACE_S
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _without_api_key(argv: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--api-key", "--api-key-file"):
            skip = True
        elif not word.startswith(("--api-key=", "--api-key-file=")):
            kept.append(word)
    return kept
