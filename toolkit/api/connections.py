"""What uvicorn's HTTP protocol leaves open: deadlines for a request's headers and body, a cap on
open connections, and accept errors that are logged once a while instead of per attempt.

A connection must deliver a request's headers within `--header-timeout` seconds of connecting (or
of its last answer), and the body within `--body-timeout` seconds of the headers; otherwise it is
closed. Idle
connections, slowloris headers and bodies that never finish so cost a socket for seconds, not
forever. Past `max_connections` open connections, a new one is closed as soon as it is accepted,
so that the process never runs out of descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

DESCRIPTORS_KEPT_FREE = 256  # for model files, pipes, the engine link and the tokenizer's threads
_REPORT_EVERY_S = 10.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines and the cap of the module docstring."""

    max_connections = 1024
    header_timeout_s = 10.0
    body_timeout_s = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: object = None
        if len(self.connections) > self.max_connections:
            _REFUSED.note(f"more than {self.max_connections} open connections: closing new ones")
            transport.close()
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline of what the connection owes now: headers (IDLE) or a body (SEND_BODY)."""
        state = self.conn.their_state
        if state is self._waiting_for:
            return  # already counting down: more bytes of the same part do not buy more time
        self._cancel_deadline()
        self._waiting_for = state
        timeout = {h11.IDLE: self.header_timeout_s, h11.SEND_BODY: self.body_timeout_s}.get(state)
        if timeout is not None and not self.transport.is_closing():
            self._deadline = self.loop.call_later(timeout, self._expire, state)

    def _expire(self, state: Any) -> None:
        if self.conn.their_state is state and not self.transport.is_closing():
            part = "request headers" if state is h11.IDLE else "request body"
            _EXPIRED.note(f"closed connections whose {part} did not arrive in time")
            self.transport.close()

    def _cancel_deadline(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
        self._deadline = None


class _OnceAWhile:
    """A warning logged at most once every `_REPORT_EVERY_S`, with how often it happened."""

    def __init__(self) -> None:
        self.count = 0
        self.last = -_REPORT_EVERY_S

    def note(self, message: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= _REPORT_EVERY_S:
            logger.warning("%s (%d times)", message, self.count)
            self.count, self.last = 0, now


_REFUSED, _EXPIRED, _ACCEPT = _OnceAWhile(), _OnceAWhile(), _OnceAWhile()


def guarded_protocol(
    max_connections: int | None, header_timeout_s: float, body_timeout_s: float
) -> type[GuardedH11Protocol]:
    """The protocol class for a server with these limits (no cap: what the descriptor limit,
    raised to its hard limit, allows)."""
    cap = max_connections or max(64, raise_descriptor_limit() - DESCRIPTORS_KEPT_FREE)
    limits = {"max_connections": cap, "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), limits)


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit of open descriptors to its hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log a failing accept() (out of descriptors, say) once a while, without its traceback;
    asyncio's default handler logs a traceback for every retry."""
    default = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "accept" in str(context.get("message", "")):
            _ACCEPT.note(f"{context['message']}: {context.get('exception')!r}")
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
