"""Stopping a process tree and waiting for its port: the machinery behind
`toolkit.utils.terminate_process`. Standard library and psutil only, like the helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import Any

import psutil

KILL_WAIT_S = 5.0


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) the way servers bind; port 0 picks a free port."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR as servers set it: TIME_WAIT leftovers of an earlier server don't count as
        # "in use", a listening socket does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


def stop_tree(process: subprocess.Popen[Any], group: int | None, timeout: float) -> None:
    """SIGTERM to the process, its group and every descendant; SIGKILL to what is still alive
    after `timeout` seconds. Descendants are collected first: they are re-parented once their
    parent dies."""
    members = _tree_members(process, group)
    _signal_tree(process, group, members, signal.SIGTERM)
    if not _wait_gone(process, members, time.monotonic() + timeout):
        _signal_tree(process, group, members, signal.SIGKILL)
        _wait_gone(process, members, time.monotonic() + KILL_WAIT_S)
    process.wait(timeout=KILL_WAIT_S)


def owned_group(process: subprocess.Popen[Any], started_by_us: bool) -> int | None:
    """The process group to signal, only when the process leads a group other than ours."""
    if started_by_us:
        # start_new_session made the child a group leader; the group outlives the leader while
        # orphaned grandchildren remain in it.
        return process.pid
    if process.poll() is not None:
        return None
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        return None
    return group if group == process.pid and group != os.getpgrp() else None


def _tree_members(process: subprocess.Popen[Any], group: int | None) -> list[psutil.Process]:
    """Descendants of the process plus the members of its group, excluding the process itself."""
    members: dict[int, psutil.Process] = {}
    if process.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(process.pid).children(recursive=True):
                members[child.pid] = child
    if group is not None:
        for pid in psutil.pids():
            if pid == process.pid or pid in members:
                continue
            try:
                if os.getpgid(pid) == group:
                    members[pid] = psutil.Process(pid)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                continue
    return list(members.values())


def _signal_tree(
    process: subprocess.Popen[Any],
    group: int | None,
    members: list[psutil.Process],
    sig: signal.Signals,
) -> None:
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    for member in members:
        # psutil checks the pid still names the process we collected, not a reused pid.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            member.send_signal(sig)
    if process.poll() is None:
        process.send_signal(sig)


def _is_alive(member: psutil.Process) -> bool:
    try:
        # A zombie is dead for our purposes: only its parent (or init) can reap it.
        return member.is_running() and member.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(process: subprocess.Popen[Any], members: list[psutil.Process], deadline: float) -> bool:
    delay = 0.01
    while process.poll() is None or any(_is_alive(m) for m in members):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def wait_port_free(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            bound_socket(host, port).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                message = f"port {port} on {host} still in use {timeout:g} s after exit"
                raise TimeoutError(message) from None
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
