"""Between JSON and the service: parse a request body into its schema, sort its inputs into a
service request, and shape the service's result as each route answers it."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, TypeVar

import ijson
import numpy as np
import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from toolkit.api.observability import new_id
from toolkit.api.prescan import PRESCAN_BYTES, prescan
from toolkit.api.schemas import CohereEmbedRequest, EmbeddingRequest, EncodeRequest, SparseEmbedRequest
from toolkit.errors import InvalidRequestError, echoed
from toolkit.service.compact import compact
from toolkit.service.inference import EmbedRequest, EmbedResult
from toolkit.service.similarity import Scores
from toolkit.service.sparse import pairs
from toolkit.service.validation import RequestLimits

Body = TypeVar("Body", bound=BaseModel)


async def parse_body(
    request: Request, schema: type[Body], limits: RequestLimits | None = None, fields: tuple[str, ...] = ()
) -> Body:
    """Parse the body as JSON whatever its Content-Type (curl -d sends form encoding by default).
    A large body is first prescanned against `limits` for its input `fields`, and parsed beside
    the event loop, which must stay free for other requests."""
    raw = await request.body()
    try:
        if len(raw) <= PRESCAN_BYTES:
            data = orjson.loads(raw)
        else:
            data = await asyncio.to_thread(_prescanned, raw, limits, fields)
    except (orjson.JSONDecodeError, ijson.JSONError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _prescanned(raw: bytes, limits: RequestLimits | None, fields: tuple[str, ...]) -> Any:
    if limits is not None:
        prescan(raw, fields, limits)
    return orjson.loads(raw)


def json_body(schema: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI description of a JSON body that the route parses itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema.model_json_schema()}},
        }
    }


def embed_request(
    raw: Any,
    body: EmbeddingRequest | EncodeRequest,
    param: str = "input",
    accepts: str = "texts or token ids",
) -> EmbedRequest:
    """The service's request for a body's raw inputs (the service sorts and checks them)."""
    return EmbedRequest(
        inputs=raw,
        param=param,
        accepts=accepts,
        dimensions=body.dimensions,
        prompt=body.prompt,
        prompt_name=body.prompt_name,
        truncate=body.truncate,
        truncation_side=body.truncation_side,
        max_active_dims=body.max_active_dims if isinstance(body, EmbeddingRequest) else None,
    )


def sparse_embed_request(body: SparseEmbedRequest, prompts: dict[str, str]) -> EmbedRequest:
    """The service's request for an /embed_sparse body: its input type picks the route, and the
    prompt of that name where the model has one and the body names none (as
    sentence-transformers' encode_query and encode_document do)."""
    prompt_name = body.prompt_name
    if prompt_name is None and body.input_type is not None:
        name = body.input_type.removeprefix("search_")
        prompt_name = name if name in prompts else None
    return EmbedRequest(
        inputs=body.inputs,
        param="inputs",
        accepts="texts",
        prompt_name=prompt_name,
        truncate=body.truncate,
        truncation_side=body.truncation_direction.lower() if body.truncation_direction else None,
        route=body.input_type,
        max_active_dims=body.max_active_dims,
    )


# Cohere's input types, and the names a model's sentence-transformers prompts give them, in order.
INPUT_TYPE_PROMPTS = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}
# Cohere's truncate: which end is cut (None: refused when too long). Cohere's default is END.
COHERE_TRUNCATE = {"NONE": None, "START": "left", "END": "right"}


EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
_TYPES = ", ".join(EMBEDDING_TYPES)


def embedding_types(raw: object) -> list[str]:
    """/v2/embed's `embedding_types`, each once, in order; `float` when absent. Counted before
    any entry is looked at: each entry costs a pass over the embeddings."""
    if raw is None:
        return ["float"]
    if not isinstance(raw, list) or not raw or len(raw) > len(EMBEDDING_TYPES):
        raise InvalidRequestError(
            f"'embedding_types' must be a list of 1 to {len(EMBEDDING_TYPES)} of {_TYPES}",
            param="embedding_types",
        )
    unknown = next((kind for kind in raw if kind not in EMBEDDING_TYPES), None)
    if unknown is not None:
        raise InvalidRequestError(
            f"unknown embedding type {echoed(repr(unknown))}; this server returns {_TYPES}",
            param="embedding_types",
        )
    return list(dict.fromkeys(raw))


def cohere_embed_request(body: CohereEmbedRequest, prompts: dict[str, str]) -> EmbedRequest:
    """The service's request for a /v2/embed body: the model's prompt for its input type (none
    where the model has no such prompt), Cohere's truncation, its output dimension."""
    prompt_name, prompt = None, None
    if body.input_type is not None:
        names = INPUT_TYPE_PROMPTS[body.input_type]
        prompt_name = next((name for name in names if name in prompts), None)
        prompt = None if prompt_name else ""
    side = COHERE_TRUNCATE[body.truncate or "END"]
    return EmbedRequest(
        inputs=body.texts,
        param="texts",
        accepts="texts",
        dimensions=body.output_dimension,
        dimensions_param="output_dimension",
        prompt=prompt,
        prompt_name=prompt_name,
        truncate=side is not None,
        truncation_side=side,
    )


def is_single_input(raw: Any) -> bool:
    """One text or one token-id list, as opposed to a list of them."""
    return isinstance(raw, str) or bool(isinstance(raw, list) and raw and isinstance(raw[0], int))


def embeddings_data(
    result: EmbedResult, as_base64: bool, kind: str = "float", sparse: bool = False
) -> list[dict[str, Any]]:
    """OpenAI's `data`: one embedding object per input, in order, as floats unless `kind` names
    a compact type (integers, or base64 of their bytes), or `sparse` (index, value) pairs."""
    rows = [pairs(row) for row in result.embeddings] if sparse else compact(result.embeddings, kind)
    return [
        {"object": "embedding", "index": i, "embedding": _as_base64(row) if as_base64 else row}
        for i, row in enumerate(rows)
    ]


def rerank_answer(model: str, scores: Scores, top_n: int | None, with_documents: bool) -> dict[str, Any]:
    """The documents' indices by descending score, in the shape Cohere, Jina, vLLM and SGLang
    clients read (`results`, `usage`, `meta`)."""
    texts = scores.documents
    order = np.argsort(-scores.scores, kind="stable")[: top_n or len(texts)]
    results = []
    for index in order.tolist():
        result: dict[str, Any] = {"index": index, "relevance_score": float(scores.scores[index])}
        if with_documents:
            result["document"] = {"text": texts[index]}
        results.append(result)
    tokens = scores.prompt_tokens
    return {
        "id": f"rerank-{new_id()}",
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": {"billed_units": {"input_tokens": tokens, "search_units": 1}},
    }


def score_answer(model: str, scores: Scores) -> dict[str, Any]:
    """vLLM's /score answer: one score object per pair."""
    tokens = scores.prompt_tokens
    return {
        "id": f"score-{new_id()}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores.scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def cohere_embed_answer(texts: list[str], result: EmbedResult, kinds: list[str]) -> dict[str, Any]:
    """Cohere's /v2/embed answer: the embeddings under each type asked for."""
    embeddings: dict[str, Any] = {}
    for kind in kinds:
        if kind == "base64":
            embeddings[kind] = [_as_base64(row) for row in result.embeddings]
        else:
            embeddings[kind] = compact(result.embeddings, kind)  # orjson writes numpy arrays
    return {
        "id": new_id(),
        "response_type": "embeddings_by_type",
        "embeddings": embeddings,
        "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": result.prompt_tokens}},
    }


def sparse_answer(result: EmbedResult) -> list[list[dict[str, float]]]:
    """text-embeddings-inference's /embed_sparse answer: each input's non-zero (index, value)."""
    return [pairs(row) for row in result.embeddings]


def encode_items(result: EmbedResult) -> list[dict[str, Any]]:
    """SGLang's /encode answer: each embedding with its meta info."""
    return [
        {
            "embedding": row,
            "meta_info": {"id": new_id(), "prompt_tokens": count, "finish_reason": None},
        }
        for row, count in zip(result.embeddings, result.token_counts, strict=True)
    ]


def _as_base64(row: np.ndarray) -> str:
    """A row's bytes, little-endian: float32, or the integers of a compact type."""
    data = row.astype("<f4", copy=False) if row.dtype.kind == "f" else row
    return base64.b64encode(data.tobytes()).decode("ascii")
