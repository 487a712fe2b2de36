"""FastAPI application: the OpenAI embeddings route and the native routes.

Routes only translate between HTTP and the engine; validation lives in the engine and the schemas,
errors in `toolkit.server.errors`. The model loads in the background after the socket is bound:
/health answers 503 until the first warm-up batch has run, then 200, and 503 again while draining
or once the inference worker has died.

Middleware, outermost first: observability (request id, timing headers, metrics, access log),
CORS (only with --cors-allow-origins), `Connection: close` while draining, the body-size limit.
Every route but /health needs the api key when one is set, /metrics and /openapi.json included:
they describe the deployment.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.middleware.cors import CORSMiddleware

from toolkit.engine import EmbedRequest, EmbedResult, Engine
from toolkit.errors import (
    AuthenticationError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    ServiceUnavailableError,
    ShuttingDownError,
)
from toolkit.metrics import EXPOSITION_CONTENT_TYPE, Metrics
from toolkit.server.disconnect import cancel_on_disconnect
from toolkit.server.errors import install_error_handlers
from toolkit.server.lifecycle import Admission, CloseWhileDraining
from toolkit.server.limits import BodySizeLimit
from toolkit.server.observability import Observability, new_id, request_context
from toolkit.server.responses import JSONResponse
from toolkit.server.schemas import EmbeddingRequest, EncodeRequest
from toolkit.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    args: ServerArgs
    model_path: str
    tokenizer_path: str
    engine: Engine | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    admission: Admission = field(default_factory=Admission)
    metrics: Metrics = field(default_factory=Metrics)

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise ServiceUnavailableError("the model is still loading; retry shortly")
        if not self.engine.batcher.alive:
            raise ServiceUnavailableError("the inference worker has stopped; restart the server")
        return self.engine


def create_app(
    state: ServerState,
    load_engine: Callable[[], Engine],
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """`load_engine` runs in a worker thread once the server starts; `on_fatal` hears of its failure."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(state, load_engine, on_fatal))
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            if state.engine is not None:
                await state.engine.batcher.close()

    # FastAPI's /docs and /redoc are left out: they fetch their scripts from a CDN (useless
    # offline) and could not send the api key; the schema itself is served below.
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
    authorized = [Depends(_api_key_check(state.args.api_key))] if state.args.api_key else []
    _watch(state)

    @app.get("/health")
    async def health() -> Response:
        if state.admission.draining:
            raise ShuttingDownError("the server is shutting down")
        state.ready_engine()
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/get_model_info", dependencies=authorized)
    async def model_info() -> Response:
        info: dict[str, Any] = {
            "model_path": state.model_path,
            "tokenizer_path": state.tokenizer_path,
            "is_generation": False,
            "served_model_name": state.args.model_name,
        }
        if state.engine is not None:
            engine = state.engine
            info |= {
                "embedding_dim": engine.embedding_dim,
                "max_model_len": engine.limits.context_length,
                "pooling": list(engine.spec.pooling_modes),
                "normalize": engine.spec.normalize,
                "prompts": engine.spec.prompts,
                "matryoshka_dimensions": engine.spec.matryoshka_dimensions,
            }
        return JSONResponse(info)

    @app.get("/metrics", dependencies=authorized, include_in_schema=False)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=EXPOSITION_CONTENT_TYPE)

    @app.get("/openapi.json", dependencies=authorized, include_in_schema=False)
    async def openapi() -> Response:
        return JSONResponse(app.openapi())

    @app.post("/v1/embeddings", dependencies=authorized, openapi_extra=_json_body(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        with state.admission.admit(request.client):
            body = await _parse_body(request, EmbeddingRequest)
            if body.model is not None and body.model != state.args.model_name:
                raise ModelNotFoundError(
                    f"model {body.model!r} is not served here; this server serves {state.args.model_name!r}",
                    param="model",
                )
            result = await _embed(state, request, _embed_request(body.input, body))
        as_base64 = body.encoding_format == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": _as_base64(row) if as_base64 else row}
            for i, row in enumerate(result.embeddings)
        ]
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        return JSONResponse({"object": "list", "data": data, "model": state.args.model_name, "usage": usage})

    @app.post("/encode", dependencies=authorized, openapi_extra=_json_body(EncodeRequest))
    async def encode(request: Request) -> Response:
        with state.admission.admit(request.client):
            body = await _parse_body(request, EncodeRequest)
            if (body.text is None) == (body.input_ids is None):
                raise InvalidRequestError("send exactly one of 'text' or 'input_ids'", param="text")
            raw = body.text if body.text is not None else body.input_ids
            single = _is_single_input(raw)
            param = "text" if body.text is not None else "input_ids"
            result = await _embed(state, request, _embed_request(raw, body, param=param))
        items = _encode_items(result)
        return JSONResponse(items[0] if single else items)

    # Each middleware added wraps the ones before it: the body limit is innermost, CORS answers
    # preflights before any route or key check, and observability sees every answer.
    app.add_middleware(BodySizeLimit, max_bytes=state.args.max_request_bytes)
    app.add_middleware(CloseWhileDraining, admission=state.admission)
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
        ready=lambda: state.engine is not None,
    )
    return app


def _without_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry hooks, switched off where this FastAPI has them: they look up
    the global providers on every request (6 % of the event loop's time under load, by py-spy),
    and this server already exports its metrics at /metrics."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


async def _embed(state: ServerState, request: Request, embed_request: EmbedRequest) -> EmbedResult:
    """Run the engine for an admitted request whose body is read, unless its client leaves first."""
    context = request_context(request)
    engine = state.ready_engine()
    context.timing.engine_called = time.perf_counter()
    result = await cancel_on_disconnect(request.receive, engine.embed(embed_request, context.timing))
    context.timing.done = time.perf_counter()
    context.inputs = len(result.token_counts)
    context.tokens = result.prompt_tokens
    return result


def _watch(state: ServerState) -> None:
    """Feed the scrape-time gauges from the live state."""

    def queued(attribute: str) -> Callable[[], float]:
        return lambda: getattr(state.engine.batcher, attribute) if state.engine is not None else 0

    def ready() -> float:
        engine = state.engine
        return float(engine is not None and engine.batcher.alive and not state.admission.draining)

    state.metrics.watch(
        queue_inputs=queued("queued_inputs"),
        queue_tokens=queued("queued_tokens"),
        in_flight=lambda: state.admission.in_flight,
        ready=ready,
    )


async def _load(
    state: ServerState,
    load_engine: Callable[[], Engine],
    on_fatal: Callable[[BaseException], None] | None,
) -> None:
    try:
        engine = await _in_daemon_thread(load_engine)
    except Exception as exc:
        if isinstance(exc, ModelLoadError):  # a known cause: one clear line
            logger.error("error: %s", exc)
        else:
            logger.exception("loading the model failed")
        if on_fatal is not None:
            on_fatal(exc)
        return
    engine.batcher.on_batch = state.metrics.observe_batch
    engine.batcher.start()
    state.engine = engine
    logger.info("The server is ready to embed with %s.", state.args.model_name)


T = TypeVar("T")


async def _in_daemon_thread(work: Callable[[], T]) -> T:
    """`work()` on a daemon thread: unlike asyncio.to_thread's pool, one that a shutdown does not
    wait for. A server stopped while loading exits at once, and a front end stopped while it
    waits for its engine's HELLO is not held by the blocked read."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(_settle, answer, result, error)

    threading.Thread(target=run, name="load", daemon=True).start()
    return await answer


def _settle(answer: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if answer.done():  # the waiting task was cancelled
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)  # type: ignore[arg-type]  # no error: work() returned a T


Body = TypeVar("Body", bound=BaseModel)


async def _parse_body(request: Request, schema: type[Body]) -> Body:
    """Parse the body as JSON whatever its Content-Type (curl -d sends form encoding by default)."""
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _json_body(schema: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI description of a JSON body that the route parses itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema.model_json_schema()}},
        }
    }


def _api_key_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    expected = api_key.encode()

    # async, though it never awaits: FastAPI runs a plain function dependency in a worker
    # thread, one thread hop per request for a check that takes microseconds.
    async def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 9110). The key is compared in constant time: the
        # answer time must not reveal how much of it matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise AuthenticationError("missing or wrong API key; send 'Authorization: Bearer KEY'")

    return check


def _model_card(state: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": state.args.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "toolkit",
        "root": state.model_path,
    }
    if state.engine is not None:
        card["max_model_len"] = state.engine.limits.context_length
    return card


def _embed_request(raw: Any, body: EmbeddingRequest | EncodeRequest, param: str = "input") -> EmbedRequest:
    """Sort the four input forms into texts or token-id lists."""
    options: dict[str, Any] = {
        "param": param,
        "dimensions": body.dimensions,
        "prompt": body.prompt,
        "prompt_name": body.prompt_name,
        "truncate": body.truncate,
        "truncation_side": body.truncation_side,
    }
    if _is_single_input(raw):
        return (
            EmbedRequest(texts=[raw], **options)
            if isinstance(raw, str)
            else EmbedRequest(token_ids=[raw], **options)
        )
    if raw and isinstance(raw[0], list):
        return EmbedRequest(token_ids=raw, **options)
    return EmbedRequest(texts=raw, **options)


def _is_single_input(raw: Any) -> bool:
    """One text or one token-id list, as opposed to a list of them."""
    return isinstance(raw, str) or bool(raw and isinstance(raw[0], int))


def _as_base64(row: np.ndarray) -> str:
    return base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii")


def _encode_items(result: EmbedResult) -> list[dict[str, Any]]:
    return [
        {
            "embedding": row,
            "meta_info": {"id": new_id(), "prompt_tokens": count, "finish_reason": None},
        }
        for row, count in zip(result.embeddings, result.token_counts, strict=True)
    ]
