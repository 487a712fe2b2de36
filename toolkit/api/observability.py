"""Per-request bookkeeping as a pure ASGI middleware: request id, timing headers, metrics, access log.

Every response carries `X-Request-Id` (the client's own, when it sent a sane one) and
`Server-Timing` (tokenize, queue, inference and total, in milliseconds, for what the request went
through). One access-log line per request, never with its body:
`method=POST path=/v1/embeddings status=200 duration_ms=12.3 inputs=3 tokens=42 request_id=... client=...`.
Probes (/health, /metrics) and everything answered before the model is ready (the readiness polling
of `wait_for_server`) are logged at debug level, so they do not flood a notebook.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from toolkit.api.metrics import Metrics
from toolkit.scheduling.timing import RequestTiming

access_logger = logging.getLogger("toolkit.access")

_SCOPE_KEY = "toolkit.request"
_QUIET_PATHS = frozenset({"/health", "/metrics"})
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_OTHER_ROUTE = "other"  # unknown paths share one label, so scanners cannot inflate the metrics


@dataclass
class RequestContext:
    """What one request's handler tells the middleware, and the timeline it stamps."""

    request_id: str
    timing: RequestTiming = field(default_factory=RequestTiming)
    inputs: int = 0
    tokens: int = 0


def request_context(request: Request) -> RequestContext:
    context: RequestContext = request.scope[_SCOPE_KEY]
    return context


class Observability:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        routes: frozenset[str],
        ready: Callable[[], bool],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.ready = ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext(_request_id(scope))
        scope[_SCOPE_KEY] = context
        status = 500  # what the client gets if the app raises before answering
        answered: float | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                answered = time.perf_counter()
                extra = [
                    (b"x-request-id", context.request_id.encode()),
                    (b"server-timing", _server_timing(context.timing, answered).encode()),
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            seconds = (answered or time.perf_counter()) - context.timing.received
            self._record(scope, context, status, seconds)

    def _record(self, scope: Scope, context: RequestContext, status: int, seconds: float) -> None:
        path: str = scope["path"]
        self.metrics.observe_request(path if path in self.routes else _OTHER_ROUTE, status, seconds)
        if context.inputs and 200 <= status < 300:
            self.metrics.observe_embedding(context.timing, context.inputs, context.tokens)
        quiet = path in _QUIET_PATHS or not self.ready()
        level = logging.DEBUG if quiet else logging.INFO
        if not access_logger.isEnabledFor(level):
            return
        client = scope.get("client")
        access_logger.log(
            level,
            "method=%s path=%s status=%d duration_ms=%.1f inputs=%d tokens=%d request_id=%s client=%s",
            scope["method"],
            # The raw target, percent-escaped as sent: a decoded path could smuggle a newline.
            scope.get("raw_path", b"").decode("ascii", "backslashreplace") or path,
            status,
            seconds * 1000,
            context.inputs,
            context.tokens,
            context.request_id,
            f"{client[0]}:{client[1]}" if client else "-",
        )


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given = value.decode("latin-1")
            return given if _SANE_REQUEST_ID.fullmatch(given) else new_id()
    return new_id()


_ID_SOURCE = random.Random()  # its own state, seeded from the OS: nobody's random.seed() repeats ids


def new_id() -> str:
    """32 random hex digits, as unique as a uuid4 but drawn without a system call: uuid4 reads
    os.urandom, which showed in the event loop's profile. Ids need not be unpredictable, only
    distinct."""
    return f"{_ID_SOURCE.getrandbits(128):032x}"


def _server_timing(timing: RequestTiming, answered: float) -> str:
    spans = [*timing.stages().items(), ("total", answered - timing.received)]
    return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in spans)
