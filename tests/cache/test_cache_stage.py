"""The cache stage on the in-process store, with the rest of the chain faked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import orjson
import pytest

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.errors import BackendProtocolError
from leangate.backend.sse import DONE_EVENT, encode_event
from leangate.backend.tokenizer import Tokenizer
from leangate.backend.transport import HttpxTransport
from leangate.cache.embedder import Embedder
from leangate.cache.intermediate import IntermediateCache
from leangate.cache.services import Breaker, CacheServices
from leangate.cache.stage import CacheSettings, CacheStage
from leangate.cache.store import MemoryStore, Store, StoreError
from leangate.middleware.context import JsonResult, RequestContext, Result, StreamResult
from leangate.middleware.endpoint import forward
from leangate.middleware.metrics import Metrics
from leangate.middleware.pipeline import build_chain
from leangate.middleware.services import Services

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
SSE = "text/event-stream"


def _stage(store: Store | None = None) -> tuple[CacheStage, CacheServices, Metrics]:
    metrics = Metrics()
    cache = CacheServices(store if store is not None else MemoryStore(), metrics)
    backend = BackendClient(BackendSettings())
    services = Services(backend, metrics, cache, Embedder(), Tokenizer(backend))
    return CacheStage("cache", CacheSettings(), services), cache, metrics


def _ctx(
    backend: BackendClient | None = None,
    *,
    body: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> RequestContext:
    whole = {**BODY, "stream": True, **(body or {})}
    return RequestContext.validated(
        "chat",
        whole,
        tenant="t",
        backend=backend or BackendClient(BackendSettings()),
        headers=headers,
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


# --- responses dropped unread ----------------------------------------------------------------


class _SseServer:
    """A backend that streams a short answer."""

    def __init__(self) -> None:
        self.calls = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        self.calls += 1
        return httpx.Response(200, content=self._body(), headers={"content-type": SSE})

    async def _body(self) -> AsyncIterator[bytes]:
        for chunk in (_chunk("Hel"), _chunk("lo", "stop")):
            yield encode_event(chunk)
        yield DONE_EVENT


async def test_a_stream_dropped_unread_ends_its_flight_and_releases_the_backend() -> None:
    stage, cache, _ = _stage()
    server = _SseServer()
    backend = BackendClient(
        BackendSettings(urls=["http://b"]), HttpxTransport(httpx.MockTransport(server.handler))
    )
    await backend.check_health()
    chain = build_chain([(stage, None)], forward)
    dropped = _ctx(backend)
    result = await chain(dropped)
    assert isinstance(result, StreamResult)
    assert len(cache.singleflight) == 1 and backend.replicas[0].outstanding == 1
    await dropped.scope.aclose()  # what the edge does once the response was dropped
    assert len(cache.singleflight) == 0, "no stale flight for later misses to wait on"
    assert backend.replicas[0].outstanding == 0, "the upstream response was closed"
    again = _ctx(backend)
    replayed = await asyncio.wait_for(_drain(await chain(again)), 5)
    assert again.response_headers["x-leangate-cache"] == "miss", "led, not coalesced"
    assert len(replayed) == 2 and server.calls == 2
    await again.scope.aclose()
    assert len(cache.singleflight) == 0 and backend.replicas[0].outstanding == 0
    await backend.aclose()


# --- followers of a streamed miss ------------------------------------------------------------


class _Upstream:
    """A backend stream the test feeds event by event."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
        self.calls = 0

    async def handler(self, ctx: RequestContext) -> Result:
        self.calls += 1
        return StreamResult(self._events())

    async def _events(self) -> AsyncIterator[bytes]:
        while (item := await self.queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item


async def _first(result: Result) -> tuple[AsyncIterator[bytes], bytes]:
    assert isinstance(result, StreamResult)
    return result.events, await anext(result.events)


async def test_followers_receive_the_leaders_events_as_they_arrive() -> None:
    stage, cache, _ = _stage()
    upstream = _Upstream()
    chain = build_chain([(stage, None)], upstream.handler)
    leader_ctx, follower_ctx = _ctx(), _ctx()
    leader = await chain(leader_ctx)
    following = asyncio.ensure_future(chain(follower_ctx))
    await upstream.queue.put(_chunk("Hel"))
    leader_events, leader_first = await _first(leader)
    follower_events, follower_first = await _first(await asyncio.wait_for(following, 5))
    assert follower_ctx.response_headers["x-leangate-cache"] == "coalesced"
    assert follower_first == leader_first == _chunk("Hel"), "before the leader's stream ended"
    await upstream.queue.put(_chunk("lo", "stop"))
    await upstream.queue.put(None)
    assert [e async for e in leader_events] == [_chunk("lo", "stop")]
    assert [e async for e in follower_events] == [_chunk("lo", "stop")]
    assert upstream.calls == 1 and len(cache.singleflight) == 0


async def test_followers_fall_back_or_fail_like_the_leader() -> None:
    stage, _, _ = _stage()
    upstream = _Upstream()
    chain = build_chain([(stage, None)], upstream.handler)
    leader = await chain(_ctx())
    early = asyncio.ensure_future(chain(_ctx()))
    await asyncio.sleep(0.01)
    await upstream.queue.put(BackendProtocolError("cut"))
    with pytest.raises(BackendProtocolError):
        await _first(leader)
    # Before its first event, a follower falls back to a backend call of its own.
    await upstream.queue.put(_chunk("Hi", "stop"))
    await upstream.queue.put(None)
    assert await asyncio.wait_for(_drain(await early), 5) == [_chunk("Hi", "stop")]
    assert upstream.calls == 2
    # After its first event, it fails as the leader did.
    leader = await chain(_ctx(body={"temperature": 0, "seed": 2}))
    late = asyncio.ensure_future(chain(_ctx(body={"temperature": 0, "seed": 2})))
    await upstream.queue.put(_chunk("Hel"))
    leader_events, _ = await _first(leader)
    late_events, _ = await _first(await asyncio.wait_for(late, 5))
    await upstream.queue.put(BackendProtocolError("cut"))
    with pytest.raises(BackendProtocolError):
        await anext(leader_events)
    with pytest.raises(BackendProtocolError):
        await anext(late_events)


async def test_a_follower_gets_usage_only_if_it_asked() -> None:
    stage, _, _ = _stage()
    upstream = _Upstream()
    chain = build_chain([(stage, None)], upstream.handler)
    leader = await chain(_ctx(body={"stream_options": {"include_usage": True}}))
    following = asyncio.ensure_future(chain(_ctx()))
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    await upstream.queue.put(orjson.dumps(orjson.loads(_chunk("Hi", "stop")) | {"usage": None}))
    leader_events, _ = await _first(leader)
    follower_events, first = await _first(await asyncio.wait_for(following, 5))
    await upstream.queue.put(orjson.dumps({"id": "x", "choices": [], "usage": usage}))
    await upstream.queue.put(None)
    assert [orjson.loads(e)["usage"] for e in [e async for e in leader_events]] == [usage]
    assert orjson.loads(first) == orjson.loads(_chunk("Hi", "stop")), "no usage field"
    assert [e async for e in follower_events] == [], "and no usage chunk"


# --- request controls and a dead store -------------------------------------------------------


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "-inf", "soon"])
def test_unusable_ttl_headers_are_ignored(value: str) -> None:
    stage, _, _ = _stage()
    ctx = _ctx(headers={"x-leangate-cache-ttl": value})
    assert stage._controls(ctx).ttl_s == CacheSettings().ttl_s
    ctx = _ctx(headers={"x-leangate-cache-ttl": "60"})
    assert stage._controls(ctx).ttl_s == 60


class _DeadStore(MemoryStore):
    kind = "dead"

    async def get(self, key: str) -> bytes | None:
        raise StoreError("connection refused")

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        raise StoreError("connection refused")


async def test_a_dead_store_logs_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    stage, cache, metrics = _stage(_DeadStore())
    cache.breaker = Breaker(pause_s=0.0, max_pause_s=0.0)  # every request tries the store

    async def backend(ctx: RequestContext) -> Result:
        return JsonResult(orjson.dumps({"choices": [{"index": 0, "finish_reason": "stop"}]}))

    chain = build_chain([(stage, None)], backend)
    with caplog.at_level(logging.WARNING):
        for n in range(20):
            ctx = _ctx(body={"stream": False, "seed": n})
            assert isinstance(await chain(ctx), JsonResult)
            await ctx.scope.aclose()
        await cache.drain()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    lookups = metrics.registry.get_sample_value(
        "leangate_cache_errors_total", {"operation": "lookup"}
    )
    assert lookups == 20, "every failure is still counted"


async def test_the_intermediate_cache_fails_open_on_a_dead_store() -> None:
    """Plans, summaries and sub-answers rely on it: a read is a miss, a write is dropped,
    and both are counted; the caller never sees the store's error."""
    metrics = Metrics()
    cache = CacheServices(_DeadStore(), metrics)
    cache.breaker = Breaker(pause_s=0.0, max_pause_s=0.0)
    intermediate = IntermediateCache(cache)
    assert await intermediate.get("t", "decompose-answer", ["step"]) is None
    await intermediate.put("t", "decompose-answer", ["step"], "an answer")
    await cache.drain()
    errors = {
        op: metrics.registry.get_sample_value("leangate_cache_errors_total", {"operation": op})
        for op in ("intermediate-get", "intermediate-put")
    }
    assert errors == {"intermediate-get": 1, "intermediate-put": 1}
