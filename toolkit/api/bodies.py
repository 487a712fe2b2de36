"""Between JSON and the service: parse a request body into its schema, sort its inputs into a
service request, and shape the service's result as each route answers it."""

from __future__ import annotations

import asyncio
import base64
from typing import Any, TypeVar

import ijson
import numpy as np
import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from toolkit.api.observability import new_id
from toolkit.api.prescan import PRESCAN_BYTES, prescan
from toolkit.api.schemas import EmbeddingRequest, EncodeRequest
from toolkit.errors import InvalidRequestError
from toolkit.service.inference import EmbedRequest, EmbedResult
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
    )


def is_single_input(raw: Any) -> bool:
    """One text or one token-id list, as opposed to a list of them."""
    return isinstance(raw, str) or bool(isinstance(raw, list) and raw and isinstance(raw[0], int))


def embeddings_data(result: EmbedResult, as_base64: bool) -> list[dict[str, Any]]:
    """OpenAI's `data`: one embedding object per input, in order."""
    return [
        {"object": "embedding", "index": i, "embedding": _as_base64(row) if as_base64 else row}
        for i, row in enumerate(result.embeddings)
    ]


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
    return base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii")
