"""The FastAPI application: its routes, error handlers and middleware, and the service's lifespan.

The model loads in the background after the socket is bound: /health answers 503 until the
first warm-up batch has run, then 200, and 503 again while draining or once the inference worker
has died.

Middleware, outermost first: observability (request id, timing headers, metrics, access log),
CORS (only with --cors-allow-origins), `Connection: close` while draining, the body-size limit.
Every route but /health needs the api key when one is set, /metrics and /openapi.json included:
they describe the deployment.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from toolkit.api.auth import api_key_check
from toolkit.api.connections import quiet_accept_errors
from toolkit.api.drain import CloseWhileDraining
from toolkit.api.errors import install_error_handlers
from toolkit.api.limits import BodySizeLimit
from toolkit.api.observability import Observability
from toolkit.api.origins import HostAndOrigin
from toolkit.api.responses import JSONResponse
from toolkit.api.retrieval_routes import add_retrieval_routes, add_sparse_routes
from toolkit.api.routes import add_embedding_routes, add_info_routes, add_tokenizer_routes
from toolkit.api.state import ServerState, load_service
from toolkit.service.inference import InferenceService


def create_app(
    state: ServerState,
    load: Callable[[], InferenceService],
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """`load` runs in a worker thread once the server starts; `on_fatal` hears of its failure."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        quiet_accept_errors(asyncio.get_running_loop())
        loading = asyncio.create_task(load_service(state, load, on_fatal))
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            if state.service is not None:
                await state.service.close()

    # FastAPI's /docs and /redoc are left out: they fetch their scripts from a CDN (useless
    # offline) and could not send the api key; the schema itself is served at /openapi.json.
    app = FastAPI(
        title="toolkit embedding server",
        lifespan=lifespan,
        default_response_class=JSONResponse,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        **_without_telemetry(),
    )
    install_error_handlers(app)
    # Without a key there is nothing to check, and no dependency for FastAPI to solve per request.
    authorized = [Depends(api_key_check(state.args.api_key))] if state.args.api_key else []
    state.watch_gauges()
    add_info_routes(app, state, authorized)
    add_embedding_routes(app, state, authorized)
    add_tokenizer_routes(app, state, authorized)
    add_retrieval_routes(app, state, authorized)
    add_sparse_routes(app, state, authorized)
    _add_middleware(app, state)
    return app


def _add_middleware(app: FastAPI, state: ServerState) -> None:
    # Each middleware added wraps the ones before it: the body limit is innermost, CORS answers
    # preflights before the host and origin check and any route or key check, and observability
    # sees every answer.
    app.add_middleware(BodySizeLimit, max_bytes=state.args.max_request_bytes)
    app.add_middleware(CloseWhileDraining, admission=state.admission)
    args = state.args
    app.add_middleware(
        HostAndOrigin,
        bound_host=args.host,
        allowed_hosts=args.allowed_hosts,
        allowed_origins=args.cors_allow_origins,
    )
    if state.args.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.args.cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Server-Timing", "Retry-After"],
        )
    app.add_middleware(
        Observability,
        metrics=state.metrics,
        routes=frozenset(getattr(route, "path", "") for route in app.routes),
        ready=lambda: state.service is not None,
    )


def _without_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry hooks, switched off where this FastAPI has them: they look up
    the global providers on every request, and this server already exports its metrics at
    /metrics."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
