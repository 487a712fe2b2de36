"""The retrieval routes on an embedding model: rerank and score by cosine similarity (Cohere's,
Jina's, vLLM's and SGLang's paths), Cohere's /v2/embed with compact embeddings, and
text-embeddings-inference's /embed_sparse for sparse models."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.params import Depends
from fastapi.responses import Response
from pydantic import BaseModel

from toolkit.api.bodies import (
    cohere_embed_answer,
    cohere_embed_request,
    embedding_types,
    json_body,
    parse_body,
    rerank_answer,
    score_answer,
    sparse_answer,
    sparse_embed_request,
)
from toolkit.api.responses import JSONResponse
from toolkit.api.routes import check_model, limits_of, require_sparse, run_embed, run_service
from toolkit.api.schemas import CohereEmbedRequest, RerankRequest, ScoreRequest, SparseEmbedRequest
from toolkit.api.state import ServerState
from toolkit.errors import ContextLengthExceededError
from toolkit.service.similarity import Truncation, rank_documents, score_pairs

RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")
SCORE_PATHS = ("/v1/score", "/score")


def add_retrieval_routes(app: FastAPI, state: ServerState, authorized: list[Depends]) -> None:
    async def rerank(request: Request) -> Response:
        body = await parse_body(request, RerankRequest, limits_of(state), ("documents",))
        truncation = Truncation(body.truncate, body.truncation_side, body.instruction)
        with state.admission.admit(request.client):
            check_model(state, body.model)
            scores = await run_service(
                state,
                request,
                lambda service, timing: rank_documents(
                    service, body.query, body.documents, truncation, timing
                ),
            )
        answer = rerank_answer(state.args.model_name, scores, body.top_n, body.return_documents)
        return JSONResponse(answer)

    async def score(request: Request) -> Response:
        body = await parse_body(request, ScoreRequest, limits_of(state), ("text_1", "text_2"))
        truncation = Truncation(body.truncate, body.truncation_side, body.instruction)
        with state.admission.admit(request.client):
            check_model(state, body.model)
            scores = await run_service(
                state,
                request,
                lambda service, timing: score_pairs(service, body.text_1, body.text_2, truncation, timing),
            )
        return JSONResponse(score_answer(state.args.model_name, scores))

    async def cohere_embed(request: Request) -> Response:
        body = await parse_body(request, CohereEmbedRequest, limits_of(state), ("texts",))
        kinds = embedding_types(body.embedding_types)
        with state.admission.admit(request.client):
            check_model(state, body.model)
            embed = cohere_embed_request(body, state.ready_service().spec.prompts)
            try:
                result = await run_embed(state, request, embed)
            except ContextLengthExceededError as exc:  # Cohere's truncation field takes a side
                message = exc.message.replace('"truncate": true', '"truncate": "END"')
                raise ContextLengthExceededError(message, param=exc.param) from None
        return JSONResponse(cohere_embed_answer(body.texts, result, kinds))

    _add_posts(app, RERANK_PATHS, rerank, RerankRequest, authorized)
    _add_posts(app, SCORE_PATHS, score, ScoreRequest, authorized)
    _add_posts(app, ("/v2/embed",), cohere_embed, CohereEmbedRequest, authorized)


def add_sparse_routes(app: FastAPI, state: ServerState, authorized: list[Depends]) -> None:
    """text-embeddings-inference's /embed_sparse: (index, value) pairs of a sparse model."""

    async def embed_sparse(request: Request) -> Response:
        body = await parse_body(request, SparseEmbedRequest, limits_of(state), ("inputs",))
        with state.admission.admit(request.client):
            check_model(state, body.model)
            require_sparse(state, "inputs")
            embed = sparse_embed_request(body, state.ready_service().spec.prompts)
            result = await run_embed(state, request, embed)
        return JSONResponse(sparse_answer(result))

    _add_posts(app, ("/embed_sparse",), embed_sparse, SparseEmbedRequest, authorized)


def _add_posts(
    app: FastAPI,
    paths: tuple[str, ...],
    handler: Callable[[Request], Awaitable[Response]],
    schema: type[BaseModel],
    authorized: list[Depends],
) -> None:
    """POST routes whose handler parses its body itself; the schema documents it."""
    for path in paths:
        app.add_api_route(
            path, handler, methods=["POST"], dependencies=authorized, openapi_extra=json_body(schema)
        )
