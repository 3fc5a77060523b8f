"""A scripted OpenAI-compatible backend for stages' unit tests: it records every request
body it is sent and answers "ok". And ``RecordingTransport``, the production transport
keeping what a proxy sends to the real vLLM."""

from __future__ import annotations

import json
from typing import Any

import httpx

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.tokenizer import Tokenizer
from leangate.backend.transport import (
    AiohttpTransport,
    HttpxTransport,
    UpstreamRequest,
    UpstreamResponse,
)
from leangate.cache.embedder import Embedder
from leangate.cache.services import CacheServices
from leangate.cache.store import MemoryStore
from leangate.middleware.context import RequestContext
from leangate.middleware.metrics import Metrics
from leangate.middleware.protocol import RequestOptions
from leangate.middleware.services import Services

ANSWER = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class RecordingBackend:
    def __init__(self, max_model_len: int | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        card: dict[str, Any] = {"id": "m", "object": "model"}
        if max_model_len is not None:
            card["max_model_len"] = max_model_len
        self.models = {"object": "list", "data": [card]}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=self.models)
        self.bodies.append(json.loads(request.content))
        return httpx.Response(200, json=ANSWER)

    async def client(self) -> BackendClient:
        """A client of this backend whose replica has passed its health check."""
        client = BackendClient(
            BackendSettings(urls=["http://a"]), HttpxTransport(httpx.MockTransport(self.handle))
        )
        await client.check_health()
        return client


def chat_context(
    client: BackendClient,
    messages: str | list[dict[str, Any]],
    *,
    options: RequestOptions | None = None,
    **extra: Any,
) -> RequestContext:
    """A chat request of tenant ``t`` for model ``m`` (``max_tokens`` 8 unless ``extra``
    says otherwise), as the gateway would hand it to a stage; a string is one user
    message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"model": "m", "messages": messages, "max_tokens": 8, **extra}
    return RequestContext.validated("chat", body, tenant="t", backend=client, options=options)


def services_of(client: BackendClient) -> Services:
    """Services for a stage under test: an in-memory store, an embedder that loads only if
    used, the tokenizer's estimates."""
    metrics = Metrics()
    return Services(
        client, metrics, CacheServices(MemoryStore(), metrics), Embedder(), Tokenizer(client)
    )


class RecordingTransport(AiohttpTransport):
    """The production transport, keeping every chat request the proxy sends."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        if request.url.endswith("/chat/completions") and request.body:
            self.bodies.append(json.loads(request.body))
        return await super().send(request)
