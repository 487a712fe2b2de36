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
from toolkit.process.bootstrap import without_flags
from toolkit.server_flags import ENV_PREFIX

API_KEY_ENV, API_KEY_FILE_ENV = f"{ENV_PREFIX}API_KEY", f"{ENV_PREFIX}API_KEY_FILE"

logger = logging.getLogger(__name__)

POLL_S = 0.2
KILL_GRACE_S = 5.0
# A front end that exits is replaced, up to this many times per front end within the window;
# past that they are failing for good (a bad flag, a broken install) and the server stops.
_RESTARTS_PER_WINDOW = 3
_RESTART_WINDOW_S = 60.0


# Hands the engine's end of a new front end's link to engine number `index`.
LinkServer = Callable[[int, socket.socket], None]


class FrontEnds:
    def __init__(
        self,
        argv: Sequence[str],
        http_socket: socket.socket,
        count: int,
        api_key: str | None = None,
        engines: int = 1,
    ) -> None:
        # The key goes by environment, not argv, which every user can read in the process list.
        self._argv = without_flags(argv, ("--api-key", "--api-key-file"))
        self._api_key = api_key
        # Whoever starts the front ends keeps the listening socket (it never accepts on it) to
        # start replacements.
        self._http_socket = http_socket
        self._engines = engines
        # The engines' ends of the links (one per engine and front end), until `serve_links`.
        self._new_links: list[tuple[int, socket.socket]] = []
        self._serve_link: LinkServer | None = None
        self.processes = [self._start() for _ in range(count)]

    def serve_links(self, serve: LinkServer) -> None:
        """Hand every link to `serve`, those of front ends started later too."""
        self._serve_link = serve
        for index, link in self._new_links:
            serve(index, link)
        self._new_links.clear()

    def _start(self) -> subprocess.Popen[bytes]:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(self._engines)]
        links = [front_end.fileno() for _, front_end in pairs]
        env = dict(os.environ)
        env[LISTEN_FD_ENV] = str(self._http_socket.fileno())
        env[ENGINE_SOCKET_ENV] = ",".join(map(str, links))
        env.pop(API_KEY_FILE_ENV, None)
        if self._api_key is not None:
            env[API_KEY_ENV] = self._api_key
        command = [sys.executable, "-m", "toolkit.process.front_end", *self._argv]
        try:
            process = subprocess.Popen(command, env=env, pass_fds=(self._http_socket.fileno(), *links))
        finally:
            for _, front_end in pairs:
                front_end.close()
        for index, (engine_end, _) in enumerate(pairs):
            if self._serve_link is None:
                self._new_links.append((index, engine_end))
            else:
                self._serve_link(index, engine_end)
        return process

    def close_unserved_links(self) -> None:
        """Front ends still waiting for their HELLO see the engine gone."""
        for _, link in self._new_links:
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

    async def drain(self, drain_timeout: float) -> None:
        """Stop the front ends and wait while they drain; past the drain timeout and a grace
        period, the caller's exit (and `stop`) ends them."""
        self.signal_stop()
        try:
            await asyncio.wait_for(self.all_exited(), drain_timeout + KILL_GRACE_S)
        except TimeoutError:
            logger.error("HTTP front ends still running after the drain timeout: killing them")

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
