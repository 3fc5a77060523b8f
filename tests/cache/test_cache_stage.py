"""The cache stage on the in-process store, with the rest of the chain faked."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.tokenizer import Tokenizer
from leangate.cache.embedder import Embedder
from leangate.cache.services import CacheServices
from leangate.cache.stage import CacheSettings, CacheStage
from leangate.cache.store import MemoryStore
from leangate.middleware.context import RequestContext, Result, StreamResult
from leangate.middleware.metrics import Metrics
from leangate.middleware.pipeline import build_chain
from leangate.middleware.protocol import ChatCompletionRequest
from leangate.middleware.services import Services

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def _stage() -> tuple[CacheStage, CacheServices, Metrics]:
    metrics = Metrics()
    cache = CacheServices(MemoryStore(), metrics)
    backend = BackendClient(BackendSettings())
    services = Services(backend, metrics, cache, Embedder(), Tokenizer(backend))
    return CacheStage("cache", CacheSettings(), services), cache, metrics


def _ctx() -> RequestContext:
    body = {**BODY, "stream": True}
    return RequestContext(
        route="chat",
        body=body,
        raw=None,
        request=ChatCompletionRequest.model_validate(body),
        tenant="t",
        backend=BackendClient(BackendSettings()),
    )


def _chunk(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return orjson.dumps({"id": "x", "choices": [choice]})


async def _events(*payloads: bytes) -> AsyncIterator[bytes]:
    for payload in payloads:
        yield payload


async def _drain(result: Result) -> list[bytes]:
    assert isinstance(result, StreamResult)
    return [event async for event in result.events]


async def test_a_completed_stream_is_stored_and_replayed() -> None:
    stage, cache, _ = _stage()
    stream = (_chunk("Hel"), _chunk("lo", "stop"))

    async def backend(ctx: RequestContext) -> Result:
        return StreamResult(_events(*stream))

    chain = build_chain([(stage, None)], backend)
    first = _ctx()
    assert await _drain(await chain(first)) == list(stream)
    await cache.drain()
    second = _ctx()
    replayed = await _drain(await chain(second))
    assert second.response_headers["x-leangate-cache"] == "hit-exact"
    text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content", "") for e in replayed)
    assert text == "Hello"


async def test_a_stream_that_cannot_be_assembled_passes_through_unstored() -> None:
    stage, cache, metrics = _stage()
    broken = (_chunk("Hel"), b"{not json", _chunk("lo", "stop"))

    async def backend(ctx: RequestContext) -> Result:
        return StreamResult(_events(*broken))

    chain = build_chain([(stage, None)], backend)
    assert await _drain(await chain(_ctx())) == list(broken)
    await cache.drain()
    again = _ctx()
    await _drain(await chain(again))
    assert again.response_headers["x-leangate-cache"] == "miss"
    errors = metrics.registry.get_sample_value(
        "leangate_cache_errors_total", {"operation": "assemble"}
    )
    assert errors == 2, "both streams were counted as not storable"
