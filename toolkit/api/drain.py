"""Admission of embedding requests, and the drain that SIGTERM starts.

On SIGTERM (or a first Ctrl+C) the server drains, as proxies like Envoy do:
- connections open before the signal are still served, every answer now with `Connection: close`,
  so a request sent before the signal is answered even if the server had not read it yet, and the
  client's next request goes to a new connection;
- requests on connections opened after the signal get 503 `shutting_down` (with `Connection: close`
  and `Retry-After`): the listening socket stays open meanwhile, so they get that clear answer
  instead of a refused or reset connection;
- once no admitted request is left, or after `--drain-timeout` seconds, uvicorn's own shutdown
  closes the socket and the connections, the lifespan stops the batcher and the runner, and the
  process exits with 0;
- a second Ctrl+C during the drain stops the process at once, with one log line and exit code 130.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from toolkit.errors import ShuttingDownError

logger = logging.getLogger(__name__)

# Once the drain is over, connections still sending an answer get this long to finish; one still
# receiving a request body (never admitted, so the drain did not wait for it) is then cut.
_CLOSE_GRACE_S = 2.0
_INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process ended by Ctrl+C


Client = tuple[str, int]


class Admission:
    """Counts the embedding requests being served; once draining, admits only old connections."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._open_before_drain: frozenset[Client] = frozenset()

    def begin_drain(self, open_connections: Iterable[Client]) -> None:
        """`open_connections`: the (host, port) of each client connected when the drain began."""
        self._open_before_drain = frozenset(open_connections)
        self.draining = True

    @contextmanager
    def admit(self, client: Client | None) -> Iterator[None]:
        # Only the event loop's thread calls this, so plain integer updates are safe.
        if self.draining and (client is None or tuple(client) not in self._open_before_drain):
            raise ShuttingDownError("the server is shutting down; send the request to another instance")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class CloseWhileDraining:
    """ASGI middleware: while draining, every answer closes its connection after it."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.admission.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before its shutdown and exit code 0 after SIGTERM.

    uvicorn itself would close the listening socket at once and then re-raise the signal after
    shutting down, so the process would end "killed by SIGTERM".
    """

    def __init__(
        self,
        config: uvicorn.Config,
        admission: Admission,
        drain_timeout: float,
        stop_now: Callable[[int], NoReturn],
    ) -> None:
        super().__init__(config)
        self.admission = admission
        self.drain_timeout = drain_timeout
        self.stop_now = stop_now
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler on the event loop's thread: set flags only; on_tick acts on them.
        if self._drain_deadline is None:
            # uvicorn's protocols know their peer; the set is only read here, on the loop's thread.
            peers = (getattr(c, "client", None) for c in self.server_state.connections)
            self.admission.begin_drain(peer for peer in peers if peer is not None)
            self._drain_deadline = time.monotonic() + self.drain_timeout
            logger.info(
                "Received %s: refusing new requests, finishing %d in flight (at most %g s).",
                signal.Signals(sig).name,
                self.admission.in_flight,
                self.drain_timeout,
            )
        elif sig == signal.SIGINT:
            # A second Ctrl+C: stop at once. The requests in flight lose their connections; the
            # device thread is not waited for.
            logger.warning(
                "Interrupted again: stopping now, cutting %d requests in flight.", self.admission.in_flight
            )
            self.stop_now(_INTERRUPTED_EXIT_CODE)

    async def on_tick(self, counter: int) -> bool:
        # uvicorn calls this every 0.1 s; returning True starts its shutdown.
        if self._drain_deadline is not None and not self.should_exit:
            remaining = self._drain_deadline - time.monotonic()
            if self.admission.in_flight == 0 or remaining <= 0:
                if self.admission.in_flight:
                    logger.warning("drain timeout: %d requests still in flight", self.admission.in_flight)
                self.config.timeout_graceful_shutdown = _CLOSE_GRACE_S
                self.should_exit = True
        return await super().on_tick(counter)
