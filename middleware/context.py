"""What a stage sees (``RequestContext``) and what it returns (``Result``)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from leangate.backend.client import REQUEST_ID_HEADER, BackendClient
from leangate.backend.transport import UpstreamResponse
from leangate.middleware.protocol import (
    REQUEST_MODELS,
    ROUTE_PATHS,
    ChatCompletionRequest,
    CompletionRequest,
    RequestOptions,
    Route,
)
from leangate.middleware.scope import RequestScope

if TYPE_CHECKING:
    from leangate.middleware.subrequests import SubRequests


@dataclass(slots=True)
class JsonResult:
    """A complete, non-streamed answer: the backend's JSON bytes, forwarded as they are."""

    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(slots=True)
class StreamResult:
    """A streamed answer: each item is one event's JSON payload, without SSE framing.

    The iterator ending normally means the answer is complete; the edge then appends
    ``[DONE]``. A cut-short stream raises from the iterator instead.
    """

    events: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    upstream: UpstreamResponse | None = None
    """The backend's response, when ``events`` are its own and nobody read them yet: the
    edge then relays its bytes as they are, skipping parsing and re-framing. A stage that
    reads ``events`` returns a new ``StreamResult`` (without ``upstream``)."""


Result = JsonResult | StreamResult


async def aclose_quietly(events: AsyncIterator[bytes]) -> None:
    """Close an event iterator (an async generator releases its backend connection)."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def close_stream(result: StreamResult) -> None:
    """Release a stream whether or not anyone read it: its iterator and its backend
    response (an iterator that never started would not release it)."""
    await aclose_quietly(result.events)
    if result.upstream is not None:
        with contextlib.suppress(Exception):
            await result.upstream.aclose()


Request = ChatCompletionRequest | CompletionRequest
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""What a client's ``x-request-id`` may be to be used (echoed, and sent on to the backend);
anything else is ignored, never refused."""


def client_request_id(headers: Mapping[str, str]) -> str | None:
    """The client's ``x-request-id``, when it is one leangate passes on."""
    given = headers.get(REQUEST_ID_HEADER)
    return given if given is not None and REQUEST_ID.fullmatch(given) else None


@dataclass(slots=True)
class RequestContext:
    """One request as it travels through the pipeline.

    ``body`` is the JSON that will be forwarded (without the ``leangate`` field) and
    ``request`` its validated form; ``raw`` is the client's exact bytes, forwarded verbatim
    as long as no stage replaced the body. Stages change the request only through
    ``replace_body``, which keeps the three consistent (so routing follows a changed model
    or prompt) and lets the pipeline undo a failed stage's change.

    ``scope`` lives as long as the client's request and is shared with the contexts
    ``derive`` makes for sub-requests.
    """

    route: Route
    body: dict[str, Any]
    raw: bytes | None
    request: Request
    tenant: str
    backend: BackendClient
    headers: Mapping[str, str] = field(default_factory=dict)
    options: RequestOptions = field(default_factory=RequestOptions)
    response_headers: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    scope: RequestScope = field(default_factory=RequestScope)
    parent: RequestContext | None = None
    """The client's request, for a context made by ``derive``."""

    @classmethod
    def validated(
        cls,
        route: Route,
        body: dict[str, Any],
        *,
        tenant: str,
        backend: BackendClient,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        options: RequestOptions | None = None,
        scope: RequestScope | None = None,
        parent: RequestContext | None = None,
    ) -> RequestContext:
        """A context for ``body``, validated as ``route``'s request (raises
        ``pydantic.ValidationError``)."""
        return cls(
            route=route,
            body=body,
            raw=raw,
            request=REQUEST_MODELS[route].model_validate(body),
            tenant=tenant,
            backend=backend,
            headers=headers if headers is not None else {},
            options=options or RequestOptions(),
            scope=scope or RequestScope(),
            parent=parent,
        )

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def path(self) -> str:
        return ROUTE_PATHS[self.route]

    def answer_cap(self, default: int) -> int:
        """The client's cap on the answer's tokens, or ``default``."""
        cap = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        return int(cap) if cap else default

    @property
    def subrequests(self) -> SubRequests:
        """Backend calls the running stage makes on behalf of this request (see
        ``middleware/subrequests.py``)."""
        from leangate.middleware.subrequests import SubRequests

        return SubRequests(self)

    def pause_budget(self) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with ctx.pause_budget():`` stops the running stage's budget clock while
        it waits for something that is not its own work (another request's answer)."""
        from leangate.middleware.pipeline import current_frame

        frame = current_frame()
        return contextlib.nullcontext() if frame is None else frame.clock.waiting()

    def replace_body(self, body: dict[str, Any]) -> None:
        """Forward ``body`` instead; raises ``pydantic.ValidationError`` if it is not a
        valid request (inside a stage, that fails the stage open)."""
        request = REQUEST_MODELS[self.route].model_validate(body)
        self.body, self.raw, self.request = body, None, request

    def snapshot(self) -> tuple[dict[str, Any], bytes | None, Request]:
        return self.body, self.raw, self.request

    def restore(self, saved: tuple[dict[str, Any], bytes | None, Request]) -> None:
        self.body, self.raw, self.request = saved

    def derive(self, body: dict[str, Any], route: Route | None = None) -> RequestContext:
        """A context for a sub-request made on behalf of this one: same tenant, options,
        headers and scope; the model is this request's unless ``body`` names one."""
        if "model" not in body:
            body = {**body, "model": self.model}
        return RequestContext.validated(
            route or self.route,
            body,
            tenant=self.tenant,
            backend=self.backend,
            headers=self.headers,
            options=self.options,
            scope=self.scope,
            parent=self.root,
        )

    @property
    def root(self) -> RequestContext:
        return self if self.parent is None else self.parent

    def body_bytes(self) -> bytes:
        if self.raw is None:
            self.raw = orjson.dumps(self.body)
        return self.raw

    def affinity_key(self, chars: int) -> bytes | None:
        """The start of the client's prompt, so that requests sharing a prefix (and every
        sub-request of one request) share a replica and its prefix cache."""
        if chars <= 0:
            return None
        request = self.root.request
        if isinstance(request, ChatCompletionRequest):
            head = "".join(str(m.content) for m in request.messages[:2])
        else:
            head = str(request.prompt)
        return head[:chars].encode()
