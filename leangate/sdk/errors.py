"""The proxy's errors as the openai package's exceptions.

The SDK builds every error exactly as the proxy would answer it (``error_response`` and
``stream_error_payload`` of ``middleware/errors.py``), then raises the exception the openai
client raises for that answer, so ``except openai.BadRequestError`` catches the same
failures in-process as through the proxy. The openai exceptions need an HTTP request and
response; a minimal pair stands in for them, with the proxy's status and JSON body.
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import orjson

from leangate.middleware.errors import error_response, stream_error_payload
from leangate.middleware.protocol import ROUTE_PATHS, Route

BASE_URL = "http://leangate.in-process"
"""The URL the stand-in requests name: nothing listens there."""

STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}
"""The openai client's own choice of class by status (``_make_status_error``); 5xx
statuses are ``InternalServerError``, the rest ``APIStatusError``."""


def stand_in_request(route: Route) -> httpx2.Request:
    return httpx2.Request("POST", BASE_URL + ROUTE_PATHS[route])


def status_error(route: Route, status: int, body: bytes) -> openai.APIStatusError:
    """The exception the openai client raises for an error answer ``status`` and ``body``."""
    response = httpx2.Response(
        status,
        content=body,
        headers={"content-type": "application/json"},
        request=stand_in_request(route),
    )
    data = _decoded(body)
    error = data.get("error", data) if isinstance(data, dict) else data
    if status in STATUS_ERRORS:
        cls = STATUS_ERRORS[status]
    else:
        cls = openai.InternalServerError if status >= 500 else openai.APIStatusError
    return cls(f"Error code: {status} - {data}", response=response, body=error)


def request_error(route: Route, exc: Exception) -> openai.APIStatusError:
    """The exception for a request that failed before its answer started."""
    response = error_response(exc)
    return status_error(route, response.status_code, bytes(response.body))


def stream_error(route: Route, exc: Exception) -> openai.APIError:
    """The exception for a stream that failed after it started: the proxy's last error
    event, raised as the openai client raises an error event."""
    if isinstance(exc, openai.APIError):
        return exc
    return event_error(route, _decoded(stream_error_payload(exc)))


def event_error(route: Route, payload: Any) -> openai.APIError:
    """An ``{"error": ...}`` event of a stream (the proxy's or the backend's own)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return openai.APIError(
        str(message or "An error occurred during streaming"),
        stand_in_request(route),
        body=error,
    )


def _decoded(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace")


def invalid_answer(route: Route, body: bytes) -> openai.APIResponseValidationError:
    """An answer that is not the openai type it should be (the openai client in strict
    mode raises the same)."""
    response = httpx2.Response(200, content=body, request=stand_in_request(route))
    return openai.APIResponseValidationError(response, _decoded(body))


def timeout_error(route: Route) -> openai.APITimeoutError:
    return openai.APITimeoutError(stand_in_request(route))
