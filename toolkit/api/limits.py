"""Request-size limit as a pure ASGI middleware, so an oversized body is refused before parsing."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from toolkit.api.errors import error_response
from toolkit.errors import PayloadTooLargeError


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._error()).__call__(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            # Bodies without Content-Length (chunked) are counted as they arrive.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)

    def _error(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"request body exceeds the server's limit of {self.max_bytes} bytes")
