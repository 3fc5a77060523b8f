"""What a stage sees (``RequestContext``) and what it returns (``Result``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from leangate.backend.client import BackendClient
from leangate.middleware.protocol import (
    ROUTE_PATHS,
    ChatCompletionRequest,
    CompletionRequest,
    RequestOptions,
    Route,
)


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


Result = JsonResult | StreamResult


async def aclose_quietly(events: AsyncIterator[bytes]) -> None:
    """Close an event iterator (an async generator releases its backend connection)."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


@dataclass(slots=True)
class RequestContext:
    """One request as it travels through the pipeline.

    ``body`` is the JSON that will be forwarded (without the ``leangate`` field); ``raw`` is
    the client's exact bytes, forwarded verbatim as long as no stage replaced the body.
    Stages change the request only through ``replace_body`` so the pipeline can undo a
    failed stage's change.
    """

    route: Route
    body: dict[str, Any]
    raw: bytes | None
    request: ChatCompletionRequest | CompletionRequest
    tenant: str
    backend: BackendClient
    headers: Mapping[str, str] = field(default_factory=dict)
    options: RequestOptions = field(default_factory=RequestOptions)
    response_headers: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    pause_budget: Callable[[], contextlib.AbstractAsyncContextManager[None]] = field(
        default=contextlib.nullcontext
    )
    """``async with ctx.pause_budget():`` stops the running stage's budget clock (set by
    the pipeline's guard)."""

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def path(self) -> str:
        return ROUTE_PATHS[self.route]

    def replace_body(self, body: dict[str, Any]) -> None:
        self.body = body
        self.raw = None

    def body_bytes(self) -> bytes:
        if self.raw is None:
            self.raw = orjson.dumps(self.body)
        return self.raw

    def affinity_key(self, chars: int) -> bytes | None:
        """The start of the prompt, so requests sharing a prefix share a replica."""
        if chars <= 0:
            return None
        if isinstance(self.request, ChatCompletionRequest):
            head = "".join(str(m.content) for m in self.request.messages[:2])
        else:
            head = str(self.request.prompt)
        return head[:chars].encode()
