"""Keep web pages from driving the server: the `Host` a request names must be one the server
answers to, and a request from a browser page (it carries `Origin`) must come from an allowed
origin and send JSON.

A server on a loopback address answers only to loopback names and `--allowed-hosts`: a page on
another site whose name an attacker points at 127.0.0.1 (DNS rebinding) names its own host, and
is refused. A server on every interface (0.0.0.0) answers to any name, as its user chose. Pages
may post `text/plain` across origins without a preflight; a browser sends `Origin` with them, and
such a request is refused unless `--cors-allow-origins` allows that origin and the body is JSON.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from toolkit.api.errors import error_response
from toolkit.errors import ForbiddenError, echoed

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})


class HostAndOrigin:
    def __init__(
        self, app: ASGIApp, bound_host: str, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]
    ) -> None:
        self.app = app
        self.any_host = bound_host in EVERY_INTERFACE or "*" in allowed_hosts
        self.hosts = LOOPBACK_NAMES | {bound_host.lower()} | {host.lower() for host in allowed_hosts}
        self.any_origin = "*" in allowed_origins
        self.origins = frozenset(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self._problem(dict(scope["headers"]), scope["method"])
            if problem is not None:
                await error_response(ForbiddenError(problem))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, headers: dict[bytes, bytes], method: str) -> str | None:
        host = _hostname(headers.get(b"host", b"").decode("latin-1"))
        if not self.any_host and host not in self.hosts:
            return f"this server does not answer to host {echoed(host)!s}; start it with --allowed-hosts"
        origin = headers.get(b"origin")
        if origin is None or method == "OPTIONS":  # not a browser page, or CORS's preflight
            return None
        origin_text = origin.decode("latin-1")
        if not (self.any_origin or origin_text in self.origins):
            return (
                f"requests from web pages at {echoed(origin_text)} are not allowed; see --cors-allow-origins"
            )
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if method == "POST" and content_type != b"application/json":
            return "a request from a web page must send Content-Type: application/json"
        return None


def _hostname(host: str) -> str:
    """The name of a Host header, without its port."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
