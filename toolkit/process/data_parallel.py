"""The supervisor of `--dp-size N`: N engine processes, one per device, behind the HTTP front ends.

It starts the engines (`toolkit.process.dp_engine`, each with one GPU visible, or on a CPU its
share of the cores) and the front ends, and gives every front end a link of its own to every
engine: a socket pair, whose engine end goes to that engine over its control socket. A front end
sends each request to the live engine with the fewest tokens waiting (`RoutingBatcher`).

A front end that exits is replaced, with new links. An engine that exits fails its own requests;
the others go on serving, and the supervisor stops the server once none is left. SIGTERM or
SIGINT: the front ends drain, then the engines stop, then the supervisor exits with 0; a second
Ctrl+C stops everything at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from toolkit.environment import CONTROL_SOCKET_ENV, ENGINE_INDEX_ENV
from toolkit.process.bootstrap import exit_now, without_flags
from toolkit.process.front_ends import KILL_GRACE_S, POLL_S, FrontEnds
from toolkit.server_args import ServerArgs
from toolkit.service.model_files import ModelFiles

logger = logging.getLogger(__name__)

_INTERRUPTED_EXIT_CODE = 130


class Engines:
    """The engine processes and the supervisor's ends of their control sockets."""

    def __init__(self, argv: Sequence[str], args: ServerArgs) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.controls: list[socket.socket] = []
        for index in range(args.dp_size):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            env = {**os.environ, CONTROL_SOCKET_ENV: str(theirs.fileno()), ENGINE_INDEX_ENV: str(index)}
            env.update(_device_environment(args, index))
            command = [sys.executable, "-m", "toolkit.process.dp_engine", *argv]
            try:
                self.processes.append(subprocess.Popen(command, env=env, pass_fds=(theirs.fileno(),)))
            finally:
                theirs.close()
            self.controls.append(mine)

    def deliver(self, index: int, link: socket.socket) -> None:
        """Send engine `index` a front end's link (or drop it, if that engine is gone)."""
        try:
            socket.send_fds(self.controls[index], [b"L"], [link.fileno()])
        except OSError:
            pass  # the engine is gone: the front end sees this link closed and leaves it out
        finally:
            link.close()

    @property
    def alive(self) -> int:
        return sum(process.poll() is None for process in self.processes)

    def stop(self, timeout: float) -> None:
        """Close the control sockets (each engine stops), then wait; kill what is left."""
        for control in self.controls:
            control.close()
        _terminate(self.processes, timeout)


def main(args: ServerArgs, files: ModelFiles, argv: Sequence[str], http_socket: socket.socket) -> int:
    """Serve `http_socket` through the front ends and N engines until SIGTERM or a failure."""
    engines = Engines(without_flags(argv, ("--dp-size", "--api-key", "--api-key-file")), args)
    front_ends = FrontEnds(argv, http_socket, args.http_workers, args.api_key, engines=args.dp_size)
    front_ends.serve_links(engines.deliver)
    logger.info(
        "Started %d engines %s and %d HTTP front ends %s",
        args.dp_size,
        [p.pid for p in engines.processes],
        args.http_workers,
        [p.pid for p in front_ends.processes],
    )
    try:
        return asyncio.run(_supervise(engines, front_ends, args.drain_timeout))
    finally:
        front_ends.stop()
        engines.stop(KILL_GRACE_S)


async def _supervise(engines: Engines, front_ends: FrontEnds, drain_timeout: float) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set() and signum == signal.SIGINT:  # a second Ctrl+C: stop at once
            logger.warning("Interrupted again: stopping now, with the engines and front ends.")
            front_ends.kill()
            for process in engines.processes:
                process.kill()
            exit_now(_INTERRUPTED_EXIT_CODE)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    supervised = loop.create_task(front_ends.supervise(stopping))
    engines_gone = loop.create_task(_until_no_engine(engines))
    signalled = loop.create_task(stopping.wait())
    await asyncio.wait({supervised, engines_gone, signalled}, return_when=asyncio.FIRST_COMPLETED)
    for task in (supervised, engines_gone, signalled):
        task.cancel()
    if stopping.is_set():
        await front_ends.drain(drain_timeout)
        return 0
    logger.error("no engine is left" if engines_gone.done() else "HTTP front ends keep exiting")
    return 1


async def _until_no_engine(engines: Engines) -> None:
    """Return once every engine has exited; log each one that does."""
    reported: set[int] = set()
    while True:
        for index, process in enumerate(engines.processes):
            if process.poll() is not None and index not in reported:
                reported.add(index)
                logger.error("engine %d exited with code %d; the others go on", index, process.returncode)
        if not engines.alive:
            return
        await asyncio.sleep(POLL_S)


def _device_environment(args: ServerArgs, index: int) -> dict[str, str]:
    """Engine `index` sees one GPU, or, on a CPU, its share of the cores."""
    if args.device != "cpu" and args.device_ids:
        return {"CUDA_VISIBLE_DEVICES": str(args.device_ids[index % len(args.device_ids)])}
    gpus = _cuda_devices() if args.device != "cpu" else 0
    if gpus:  # more engines than GPUs share them in turn
        return {"CUDA_VISIBLE_DEVICES": str(index % gpus)}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.dp_size))}


def _cuda_devices() -> int:
    import torch  # the supervisor never loads a model: imported only to count the devices

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _terminate(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
