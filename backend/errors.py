"""The backend client's exceptions, as one tree.

Every failure of a call to an OpenAI-compatible server raises one of these, so the HTTP
edge maps the whole tree to status codes in one place::

    BackendError                   base; never raised itself
    ├── BackendUnavailable         no replica can take the request            → 503
    │   └── BackendConnectError    connecting failed before any byte was sent  → 502
    ├── BackendTimeout             the server did not answer in time           → 504
    ├── BackendProtocolError       the answer was malformed or cut short        → 502
    └── BackendStatusError         the server answered with an HTTP error       → passed through
    ModelNotFound                  no replica serves the requested model        → 404

Only ``BackendConnectError`` is retried, because nothing reached the server yet.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class of every backend failure."""

    status_code = 502
    error_type = "backend_error"


class BackendUnavailable(BackendError):
    """No healthy replica is available for the request."""

    status_code = 503
    error_type = "service_unavailable"


class BackendConnectError(BackendUnavailable):
    """Opening the connection failed; the request never reached the server."""

    status_code = 502
    error_type = "bad_gateway"


class BackendTimeout(BackendError):
    """The server did not answer within the configured timeout."""

    status_code = 504
    error_type = "timeout"


class BackendProtocolError(BackendError):
    """The server's answer could not be read, or its stream ended early."""

    status_code = 502
    error_type = "bad_gateway"


class BackendStatusError(BackendError):
    """The server answered with an HTTP error status; the body is kept verbatim."""

    def __init__(self, status_code: int, body: bytes, content_type: str) -> None:
        super().__init__(f"backend answered HTTP {status_code}")
        self.status_code = status_code
        self.body = body
        self.content_type = content_type
        self.error_type = "backend_status"


class ModelNotFound(BackendError):
    """No replica serves the model named in the request."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model
