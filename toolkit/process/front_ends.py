"""The front-end processes of an engine process: started on the shared HTTP socket, replaced when
one exits while the server runs, and never left running after the engine."""

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
from collections.abc import Sequence

from toolkit.environment import ENGINE_SOCKET_ENV, LISTEN_FD_ENV

logger = logging.getLogger(__name__)

POLL_S = 0.2
KILL_GRACE_S = 5.0
# A front end that exits is replaced, up to this many times per front end within the window;
# past that they are failing for good (a bad flag, a broken install) and the server stops.
_RESTARTS_PER_WINDOW = 3
_RESTART_WINDOW_S = 60.0


class FrontEnds:
    def __init__(self, argv: Sequence[str], http_socket: socket.socket, link_path: str, count: int) -> None:
        self._argv = list(argv)
        # The engine keeps the listening socket (it never accepts on it) to start replacements.
        self._http_socket = http_socket
        self._link_path = link_path
        self.processes = [self._start() for _ in range(count)]

    def _start(self) -> subprocess.Popen[bytes]:
        fd = self._http_socket.fileno()
        env = {**os.environ, LISTEN_FD_ENV: str(fd), ENGINE_SOCKET_ENV: self._link_path}
        command = [sys.executable, "-m", "toolkit.process.front_end", *self._argv]
        return subprocess.Popen(command, env=env, pass_fds=(fd,))

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
