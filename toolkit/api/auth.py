"""The api key check: `Authorization: Bearer KEY` on every route but /health."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from toolkit.errors import AuthenticationError


def api_key_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    expected = api_key.encode("utf-8")

    # async, though it never awaits: FastAPI runs a plain function dependency in a worker
    # thread, one thread hop per request for a check that takes microseconds.
    async def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 9110). The key is compared in constant time: the
        # answer time must not reveal how much of it matched.
        # Headers arrive decoded as Latin-1; encoding back gives the bytes sent, UTF-8 for a
        # non-ASCII key.
        sent = given.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, expected):
            raise AuthenticationError("missing or wrong API key; send 'Authorization: Bearer KEY'")

    return check
