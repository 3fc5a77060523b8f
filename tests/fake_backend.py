"""A fast fake OpenAI-compatible backend, in process: it serves ``conftest.MODEL`` and
answers every completion at once, whole or streamed as the request asks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from conftest import MODEL

from leangate.backend.transport import HttpxTransport, UpstreamResponse

MODELS = {"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 8192}]}


def _answer(chat: bool, model: object) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": "ok"}}
    else:
        choice = {"index": 0, "text": "ok"}
    return {
        "id": "fake-1",
        "object": "chat.completion" if chat else "text_completion",
        "model": model,
        "choices": [{**choice, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chat: bool, model: object) -> None:
        self._chat = chat
        self._model = model

    async def __aiter__(self) -> AsyncIterator[bytes]:
        delta = {"delta": {"content": "ok"}} if self._chat else {"text": "ok"}
        for finish in (None, "stop"):
            event = {
                "id": "fake-1",
                "object": "chat.completion.chunk" if self._chat else "text_completion",
                "model": self._model,
                "choices": [{"index": 0, **delta, "finish_reason": finish}],
            }
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"


def answer(request: httpx.Request) -> httpx.Response:
    """The fake backend's response to ``request``."""
    if request.url.path == "/v1/models":
        return httpx.Response(200, json=MODELS)
    body = json.loads(request.content)
    chat = request.url.path.endswith("/chat/completions")
    if body.get("stream"):
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, stream=_Stream(chat, body.get("model")), headers=headers)
    return httpx.Response(200, json=_answer(chat, body.get("model")))


class StreamingMockTransport(httpx.MockTransport):
    """Leaves a streamed response's body to the client, as a real server does."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = self.handler(request)
        assert isinstance(response, httpx.Response)
        return response


def fake_transport() -> HttpxTransport:
    """A transport to the fake backend, for ``create_app`` or ``ProxyThread``."""
    return HttpxTransport(StreamingMockTransport(answer))


class ChunkedResponse(UpstreamResponse):
    """A 200 response whose body arrives in the given chunks (for the SSE relay)."""

    def __init__(self, *chunks: bytes) -> None:
        self.status = 200
        self.headers = {}
        self._chunks = chunks

    async def read(self) -> bytes:
        return b"".join(self._chunks)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        pass
