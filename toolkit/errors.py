"""The exception tree of the server: every error a client can see, with its HTTP status and OpenAI type.

The HTTP layer has exactly one handler that turns a `ToolkitError` into
`{"error": {"message", "type", "param", "code"}}`; everything else raises these.
"""

from __future__ import annotations

ECHO_CHARS = 200


def echoed(value: object) -> str:
    """A client's value as an error message quotes it: its repr, cut to `ECHO_CHARS`."""
    shown = value if isinstance(value, str) else repr(value)
    return shown if len(shown) <= ECHO_CHARS else f"{shown[:ECHO_CHARS]}... ({len(shown)} characters)"


class ToolkitError(Exception):
    """Base class. Subclasses fix the HTTP status and the OpenAI error `type`."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers the answer must carry (Retry-After, WWW-Authenticate...)."""
        return {}

    def to_body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(ToolkitError):
    """The request is malformed or asks for something the model cannot do."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(ToolkitError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(ToolkitError):
    """Refused for where it comes from: a host name or a web page the server does not serve."""

    status_code = 403
    error_type = "invalid_request_error"
    default_code = "forbidden"


class NotFoundError(ToolkitError):
    status_code = 404
    error_type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class MethodNotAllowedError(ToolkitError):
    status_code = 405
    error_type = "invalid_request_error"


class PayloadTooLargeError(ToolkitError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"

    def headers(self) -> dict[str, str]:
        # The rest of the body was never read: the connection cannot carry another request.
        return {"Connection": "close"}


class OverloadedError(ToolkitError):
    """Admission refused: the queue is full. The client should retry after a short pause."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "server_overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class InferenceError(ToolkitError):
    """The model failed on a batch; the message is generic, the traceback goes to the log."""

    status_code = 500
    error_type = "server_error"


class RequestTimeoutError(ToolkitError):
    """No answer within --request-timeout: the request's work is withdrawn."""

    status_code = 504
    error_type = "server_error"
    default_code = "request_timeout"


class ServiceUnavailableError(ToolkitError):
    """The server is starting, draining or its inference worker has died."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class ShuttingDownError(ServiceUnavailableError):
    """Refused during the drain after SIGTERM: the client should go to another server or retry."""

    default_code = "shutting_down"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close", "Retry-After": "1"}


class ClientDisconnectedError(ToolkitError):
    """The client went away before its answer was ready; nobody reads this, but logs and metrics do.

    499 is nginx's "client closed request", the usual way to count such requests.
    """

    status_code = 499
    error_type = "invalid_request_error"
    default_code = "client_disconnected"


class ModelLoadError(Exception):
    """Raised at start-up when a model cannot be found or loaded; never seen by a client."""
