"""The one place where exceptions become HTTP answers, all in OpenAI's error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from toolkit.api.responses import JSONResponse
from toolkit.errors import (
    ClientDisconnectedError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    ToolkitError,
    echoed,
)

logger = logging.getLogger(__name__)


def error_response(error: ToolkitError) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=error.headers())


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ToolkitError)
    async def toolkit_error(_: Request, exc: ToolkitError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_describe_validation_error(exc))

    @app.exception_handler(ClientDisconnect)
    async def client_disconnect(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left while sending its body: nothing failed here, and nobody reads the answer.
        return error_response(ClientDisconnectedError("the client closed the connection mid-request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError(f"no route {request.method} {echoed(request.url.path)}"))
        if exc.status_code == 405:
            return error_response(
                MethodNotAllowedError(f"method {request.method} not allowed on {echoed(request.url.path)}")
            )
        error = ToolkitError(str(exc.detail))
        error.status_code = exc.status_code
        return error_response(error)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, echoed(request.url.path))
        return error_response(ToolkitError("internal server error"))


def _describe_validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """Turn pydantic's list of problems into one sentence naming the field to fix."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("invalid request body")
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members add their type names to the location; keep only the field path.
    field = next((part for part in location if not part[0].isupper() and "[" not in part), None)
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"request body is not valid JSON: {first.get('msg')}")
    if first.get("type") == "missing":
        return InvalidRequestError(f"'{field}' is required", param=field)
    if field is None:
        return InvalidRequestError(f"request body must be a JSON object: {first.get('msg')}")
    return InvalidRequestError(f"invalid '{field}': {first.get('msg')}", param=field)
