"""OpenAI-style errors raised at the edge, and how every error becomes a response.

Every error leaves the proxy as ``{"error": {"message", "type", "code"}}``; backend errors
come from the tree in ``leangate.backend.errors``, edge errors from ``ProxyError``::

    ProxyError                     the request itself is at fault
    ├── InvalidRequest             malformed JSON, missing or invalid fields   → 400
    ├── Unauthorized               missing or unknown API key                  → 401
    ├── PayloadTooLarge            body or request over a configured limit     → 413
    ├── RateLimited                over a tenant's rate or concurrency limit   → 429
    ├── ClientGone                 the client left before its answer (never sent) → 499
    └── ShuttingDown               the server stopped before the answer's end  → 503
"""

from __future__ import annotations

import orjson
from pydantic import ValidationError
from starlette.responses import Response

from leangate.backend.errors import BackendError, BackendStatusError


class ProxyError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(ProxyError):
    code = "invalid_request"


class Unauthorized(ProxyError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PayloadTooLarge(ProxyError):
    status_code = 413
    code = "request_too_large"


class RateLimited(ProxyError):
    """Its response carries ``Retry-After``: the seconds until the limit admits again."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ClientGone(ProxyError):
    """Counted in /metrics as 499 (nginx's "client closed request"); nobody reads it."""

    status_code = 499
    code = "client_closed_request"


class ShuttingDown(ProxyError):
    """A request still running at the server's drain timeout: a plain one is answered with
    it, a stream ends with it as its last event."""

    status_code = 503
    error_type = "service_unavailable"
    code = "server_shutting_down"


def error_payload(message: str, error_type: str, code: str | int | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "code": code}})


def validation_problems(exc: ValidationError, whole: str = "body") -> list[str]:
    """One line per problem, naming the field: ``messages.0.role: Field required``;
    ``whole`` names a problem with the object itself."""
    return [
        f"{'.'.join(str(p) for p in error['loc']) or whole}: {error['msg']}"
        for error in exc.errors(include_url=False)
    ]


def describe_validation_error(exc: ValidationError) -> str:
    return "; ".join(validation_problems(exc))


def error_response(exc: Exception) -> Response:
    """The HTTP response for any error the pipeline or the edge raised."""
    if isinstance(exc, BackendStatusError):
        return Response(exc.body, exc.status_code, media_type=exc.content_type)
    if isinstance(exc, ProxyError):
        body = error_payload(exc.message, exc.error_type, exc.code)
        headers = None
        if isinstance(exc, RateLimited):
            headers = {"retry-after": str(exc.retry_after_s)}
        return Response(body, exc.status_code, headers=headers, media_type="application/json")
    if isinstance(exc, BackendError):
        code = "model_not_found" if exc.status_code == 404 else exc.error_type
        body = error_payload(str(exc) or type(exc).__name__, exc.error_type, code)
        return Response(body, exc.status_code, media_type="application/json")
    body = error_payload("internal error in the proxy", "internal_error", "internal_error")
    return Response(body, 500, media_type="application/json")


def stream_error_payload(exc: BaseException) -> bytes:
    """The payload of the last event of a stream that failed after it started."""
    if isinstance(exc, BackendError):
        return error_payload(str(exc) or type(exc).__name__, exc.error_type, exc.status_code)
    if isinstance(exc, ProxyError):
        return error_payload(exc.message, exc.error_type, exc.code)
    return error_payload("internal error in the proxy", "internal_error", 500)
