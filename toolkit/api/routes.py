"""The routes: they only translate between HTTP and the service. Validation lives in the schemas
and the service, errors in `toolkit.api.errors`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.params import Depends
from fastapi.responses import Response

from toolkit.api.bodies import (
    embed_request,
    embeddings_data,
    encode_items,
    is_single_input,
    json_body,
    parse_body,
)
from toolkit.api.disconnect import cancel_on_disconnect
from toolkit.api.metrics import EXPOSITION_CONTENT_TYPE
from toolkit.api.observability import request_context
from toolkit.api.responses import JSONResponse
from toolkit.api.schemas import DetokenizeRequest, EmbeddingRequest, EncodeRequest, TokenizeRequest
from toolkit.api.state import ServerState
from toolkit.errors import InvalidRequestError, ModelNotFoundError, ShuttingDownError, echoed
from toolkit.scheduling.timing import RequestTiming
from toolkit.service.inference import EmbedRequest, EmbedResult, InferenceService
from toolkit.service.sparse_spec import SparseSpec
from toolkit.service.validation import RequestLimits


def add_info_routes(app: FastAPI, state: ServerState, authorized: list[Depends]) -> None:
    """Readiness, the model card and details, metrics and the OpenAPI schema."""

    @app.get("/health")
    async def health() -> Response:
        if state.admission.draining:
            raise ShuttingDownError("the server is shutting down")
        state.ready_service()
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/get_model_info", dependencies=authorized)
    async def model_info() -> Response:
        return JSONResponse(_model_info(state))

    @app.get("/metrics", dependencies=authorized, include_in_schema=False)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=EXPOSITION_CONTENT_TYPE)

    @app.get("/openapi.json", dependencies=authorized, include_in_schema=False)
    async def openapi() -> Response:
        return JSONResponse(app.openapi())


def add_embedding_routes(app: FastAPI, state: ServerState, authorized: list[Depends]) -> None:
    """OpenAI's /v1/embeddings and SGLang's native /encode."""

    @app.post("/v1/embeddings", dependencies=authorized, openapi_extra=json_body(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        # The body is read before admission: a body that never arrives holds no drain.
        body = await parse_body(request, EmbeddingRequest, limits_of(state), ("input",))
        with state.admission.admit(request.client):
            check_model(state, body.model)
            if body.sparse:
                require_sparse(state, "sparse")
                if body.encoding_format == "base64" or body.embedding_type not in (None, "float"):
                    raise InvalidRequestError(
                        "sparse embeddings come as (index, value) pairs: drop 'encoding_format' and "
                        "'embedding_type'",
                        param="sparse",
                    )
            result = await run_embed(state, request, embed_request(body.input, body))
        kind = body.embedding_type or "float"
        data = embeddings_data(result, body.encoding_format == "base64", kind, body.sparse)
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        return JSONResponse({"object": "list", "data": data, "model": state.args.model_name, "usage": usage})

    @app.post("/encode", dependencies=authorized, openapi_extra=json_body(EncodeRequest))
    async def encode(request: Request) -> Response:
        body = await parse_body(request, EncodeRequest, limits_of(state), ("text", "input_ids"))
        with state.admission.admit(request.client):
            if (body.text is None) == (body.input_ids is None):
                raise InvalidRequestError("send exactly one of 'text' or 'input_ids'", param="text")
            raw = body.text if body.text is not None else body.input_ids
            param, accepts = ("text", "texts") if body.text is not None else ("input_ids", "token ids")
            result = await run_embed(state, request, embed_request(raw, body, param, accepts))
        items = encode_items(result)
        return JSONResponse(items[0] if is_single_input(raw) else items)


def add_tokenizer_routes(app: FastAPI, state: ServerState, authorized: list[Depends]) -> None:
    """SGLang's and vLLM's /tokenize and /detokenize, with the model's own tokenizer."""

    @app.post("/tokenize", dependencies=authorized, openapi_extra=json_body(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        body = await parse_body(request, TokenizeRequest, limits_of(state), ("prompt",))
        with state.admission.admit(request.client):
            check_model(state, body.model)
            service = state.ready_service()
            ids = await service.tokenize(body.prompt, body.add_special_tokens)
        one = isinstance(body.prompt, str)
        counts = [len(seq) for seq in ids]
        return JSONResponse(
            {
                "tokens": ids[0] if one else ids,
                "count": counts[0] if one else counts,
                "max_model_len": service.limits.context_length,
            }
        )

    @app.post("/detokenize", dependencies=authorized, openapi_extra=json_body(DetokenizeRequest))
    async def detokenize(request: Request) -> Response:
        body = await parse_body(request, DetokenizeRequest, limits_of(state), ("tokens",))
        with state.admission.admit(request.client):
            check_model(state, body.model)
            text = await state.ready_service().detokenize(body.tokens, body.skip_special_tokens)
        return JSONResponse({"prompt": text})


def limits_of(state: ServerState) -> RequestLimits | None:
    return state.service.limits if state.service is not None else None


def check_model(state: ServerState, model: str | None) -> None:
    """A request that names a model must name the one served here."""
    if model is not None and model != state.args.model_name:
        raise ModelNotFoundError(
            f"model {echoed(repr(model))} is not served here; this server serves {state.args.model_name!r}",
            param="model",
        )


def require_sparse(state: ServerState, param: str) -> None:
    """Sparse output needs a sparse model (sentence-transformers' SparseEncoder)."""
    task = state.ready_service().spec.task
    if task != "sparse":
        raise InvalidRequestError(
            f"this model serves {task!r}, not sparse embeddings: sparse output needs a "
            "sentence-transformers SparseEncoder (SPLADE) model",
            param=param,
        )


class Counted(Protocol):
    token_counts: list[int]

    @property
    def prompt_tokens(self) -> int: ...


Result = TypeVar("Result", bound=Counted)


async def run_service(
    state: ServerState,
    request: Request,
    work: Callable[[InferenceService, RequestTiming], Awaitable[Result]],
) -> Result:
    """Run the service for an admitted request whose body is read, unless its client leaves first."""
    context = request_context(request)
    service = state.ready_service()
    context.timing.service_called = time.perf_counter()
    result = await cancel_on_disconnect(request.receive, work(service, context.timing))
    context.timing.done = time.perf_counter()
    context.inputs = len(result.token_counts)
    context.tokens = result.prompt_tokens
    return result


async def run_embed(state: ServerState, request: Request, embed: EmbedRequest) -> EmbedResult:
    return await run_service(state, request, lambda service, timing: service.embed(embed, timing))


def _model_card(state: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": state.args.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "toolkit",
        "root": state.model_path,
    }
    if state.service is not None:
        card["max_model_len"] = state.service.limits.context_length
        card["task"] = state.service.spec.task
    return card


def _model_info(state: ServerState) -> dict[str, Any]:
    info: dict[str, Any] = {
        "model_path": state.model_path,
        "tokenizer_path": state.tokenizer_path,
        "is_generation": False,
        "served_model_name": state.args.model_name,
    }
    service = state.service
    if service is not None:
        info |= {
            "task": service.spec.task,
            "embedding_dim": service.embedding_dim,
            "max_model_len": service.limits.context_length,
            "pooling": list(service.spec.pooling_modes),
            "normalize": service.spec.normalize,
            "prompts": service.spec.prompts,
            "matryoshka_dimensions": service.spec.matryoshka_dimensions,
            "after_pooling": [
                {"module": m.kind, "in_features": m.in_features, "out_features": m.out_features}
                | ({"activation": m.activation} if m.kind == "Dense" else {})
                for m in service.spec.vector_modules
            ],
            "sparse": _sparse_info(service.spec.sparse),
        }
    return info


def _sparse_info(sparse: SparseSpec | None) -> dict[str, Any] | None:
    """A sparse model's SpladePooling, its routes (an inference-free model) and its top-k."""
    if sparse is None:
        return None
    routes = None
    if sparse.query_dir is not None:
        routes = {"query": "SparseStaticEmbedding", "document": "SPLADE", "default": sparse.default_route}
    return {
        "pooling": sparse.pooling,
        "activation": sparse.activation,
        "routes": routes,
        "max_active_dims": sparse.max_active_dims,
    }
