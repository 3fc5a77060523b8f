"""The result cache as a pipeline stage: exact and semantic hits, single-flight, storage.

A request is served from cache only when the policy deems it deterministic (temperature 0
or a fixed seed, by default). Answers are stored only when complete: a plain answer with
every choice finished, or a stream that reached ``[DONE]`` normally. Errors, streams cut
short, and ``n > 1`` (unless allowed) are never stored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

from leangate.cache.keys import answer_key, exact_hash, semantic_key, semantic_parts
from leangate.cache.replay import assemble, is_complete, to_events
from leangate.cache.services import CacheServices
from leangate.cache.verify import Verifier, VerifierSettings
from leangate.middleware.context import (
    JsonResult,
    RequestContext,
    Result,
    StreamResult,
    aclose_quietly,
)
from leangate.middleware.pipeline import Handler
from leangate.middleware.services import Services

if TYPE_CHECKING:
    from leangate.cache.embedder import Embedding

CACHE_HEADER = "x-leangate-cache"
EMBED_TIMING = "cache-embed"
SIMILARITY_HEADER = "x-leangate-cache-similarity"
TTL_HEADER = "x-leangate-cache-ttl"


class CacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespace: str = "default"
    """Entries are shared only within a namespace (and always only within a tenant)."""
    ttl_s: float = Field(3600.0, gt=0)
    max_ttl_s: float = Field(7 * 86400.0, gt=0)
    """The most a request's own TTL may ask for."""
    exact: bool = True
    semantic: bool = False
    deterministic_only: bool = True
    """Serve and store only requests at temperature 0 or with a fixed seed."""
    allow_n: bool = False
    """Also cache requests with ``n > 1``."""
    singleflight: bool = True
    singleflight_wait_s: float = Field(300.0, gt=0)
    verifier: VerifierSettings = Field(default_factory=VerifierSettings)


@dataclass(slots=True)
class Controls:
    """What the caller allowed for this request (``Cache-Control`` and TTL)."""

    read: bool
    write: bool
    ttl_s: float


@dataclass(slots=True)
class Lookup:
    """What the lookup learned, reused when the answer is stored."""

    key: str
    request_hash: str
    semantic: tuple[str, str] | None = None
    vector: Embedding | None = None


class CacheStage:
    Settings: ClassVar[type[BaseModel]] = CacheSettings
    default_budget_ms: ClassVar[float | None] = 100.0

    def __init__(self, name: str, settings: CacheSettings, services: Services) -> None:
        self.name = name
        self.settings = settings
        self.cache: CacheServices = services.cache
        self.metrics = services.metrics
        self.verifier = Verifier(settings.verifier)

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        if not self._cacheable(ctx):
            ctx.response_headers[CACHE_HEADER] = "bypass"
            return await call_next(ctx)
        controls = self._controls(ctx)
        request_hash = exact_hash(ctx)
        lookup = Lookup(answer_key(ctx, self.settings.namespace, request_hash), request_hash)
        if controls.read:
            hit = await self._find(ctx, lookup)
            if hit is not None:
                return hit
        ctx.response_headers[CACHE_HEADER] = "miss"
        if not (controls.read and self.settings.singleflight):
            return await self._fetch(ctx, call_next, lookup, controls, leader=False)
        waiting = self.cache.singleflight.join(lookup.key)
        if waiting is None:
            return await self._fetch(ctx, call_next, lookup, controls, leader=True)
        async with ctx.pause_budget():
            answer = await _wait(waiting, self.settings.singleflight_wait_s)
        if answer is not None:
            return self._serve(ctx, answer, "coalesced")
        return await self._fetch(ctx, call_next, lookup, controls, leader=False)

    # --- deciding ----------------------------------------------------------------------------

    def _cacheable(self, ctx: RequestContext) -> bool:
        body = ctx.body
        if (body.get("n") or 1) > 1 and not self.settings.allow_n:
            return False
        if body.get("logprobs") or body.get("echo") or body.get("tools"):
            return False
        if not self.settings.deterministic_only:
            return True
        return body.get("temperature") == 0 or body.get("seed") is not None

    def _controls(self, ctx: RequestContext) -> Controls:
        directives = {
            d.strip().lower() for d in ctx.headers.get("cache-control", "").split(",") if d.strip()
        }
        ttl = ctx.options.cache_ttl_s or _float(ctx.headers.get(TTL_HEADER)) or self.settings.ttl_s
        return Controls(
            read="no-cache" not in directives and "no-store" not in directives,
            write="no-store" not in directives,
            ttl_s=min(ttl, self.settings.max_ttl_s),
        )

    # --- reading -----------------------------------------------------------------------------

    async def _find(self, ctx: RequestContext, lookup: Lookup) -> Result | None:
        breaker, store = self.cache.breaker, self.cache.store
        if self.settings.exact:
            answer = await breaker.call(store.get(lookup.key))
            self.metrics.cache_lookups.labels("exact", "hit" if answer else "miss").inc()
            if answer is not None:
                return self._serve(ctx, answer, "hit-exact")
        if not self.settings.semantic:
            return None
        semantic = self.cache.semantic()
        lookup.semantic = semantic_parts(ctx, self.settings.namespace)
        if semantic is None or lookup.semantic is None:
            return None
        scope, text = lookup.semantic
        started = time.perf_counter()
        lookup.vector = await semantic.embed(text)
        ctx.timings[EMBED_TIMING] = time.perf_counter() - started
        match = semantic.nearest(scope, text, lookup.vector, self.verifier)
        if match is None or not match.verdict.accepted:
            self.metrics.cache_lookups.labels("semantic", "miss").inc()
            return None
        answer = await breaker.call(store.get(match.entry.answer_key))
        if answer is None:
            await semantic.drop(match.key)
            self.metrics.cache_lookups.labels("semantic", "miss").inc()
            return None
        self.metrics.cache_lookups.labels("semantic", "hit").inc()
        ctx.response_headers[SIMILARITY_HEADER] = f"{match.verdict.similarity:.4f}"
        return self._serve(ctx, answer, "hit-semantic")

    def _serve(self, ctx: RequestContext, answer: bytes, how: str) -> Result:
        ctx.response_headers[CACHE_HEADER] = how
        if not ctx.stream:
            return JsonResult(answer)
        options = ctx.body.get("stream_options") or {}
        events = to_events(
            ctx.route, orjson.loads(answer), include_usage=bool(options.get("include_usage"))
        )
        return StreamResult(_iterate(events))

    # --- writing -----------------------------------------------------------------------------

    async def _fetch(
        self,
        ctx: RequestContext,
        call_next: Handler,
        lookup: Lookup,
        controls: Controls,
        *,
        leader: bool,
    ) -> Result:
        def done(answer: bytes | None) -> None:
            if leader:
                self.cache.singleflight.finish(lookup.key, answer)
            if answer is not None and controls.write:
                self.cache.in_background(self._store(ctx, lookup, answer, controls.ttl_s), "store")

        try:
            result = await call_next(ctx)
        except BaseException:
            done(None)
            raise
        if isinstance(result, StreamResult):
            return StreamResult(self._tee(ctx, result.events, done), result.headers)
        done(_storable_json(result))
        return result

    async def _tee(
        self,
        ctx: RequestContext,
        events: AsyncIterator[bytes],
        done: Callable[[bytes | None], None],
    ) -> AsyncIterator[bytes]:
        """Pass events through, and hand the whole answer on only if the stream completed.

        This runs after the guard has returned, so it fails open by itself: an answer it
        cannot assemble is simply not stored.
        """
        seen: list[bytes] = []
        answer: bytes | None = None
        try:
            async for payload in events:
                seen.append(payload)
                yield payload
            try:
                whole = assemble(ctx.route, seen)
            except ValueError:
                self.metrics.cache_errors.labels("assemble").inc()
                whole = None
            if whole is not None and is_complete(whole):
                answer = orjson.dumps(whole)
        finally:
            done(answer)
            await aclose_quietly(events)

    async def _store(
        self, ctx: RequestContext, lookup: Lookup, answer: bytes, ttl_s: float
    ) -> None:
        await self.cache.breaker.call(self.cache.store.set(lookup.key, answer, ttl_s))
        if not self.settings.semantic:
            return
        semantic = self.cache.semantic()
        parts = lookup.semantic or semantic_parts(ctx, self.settings.namespace)
        if semantic is None or parts is None:
            return
        from leangate.cache.semantic import Entry

        scope, text = parts
        vector = lookup.vector if lookup.vector is not None else await semantic.embed(text)
        key = semantic_key(ctx, self.settings.namespace, lookup.request_hash)
        await self.cache.breaker.call(
            semantic.add(key, Entry(scope, text, lookup.key), vector, ttl_s)
        )


def _storable_json(result: JsonResult) -> bytes | None:
    if result.status != 200:
        return None
    try:
        whole = orjson.loads(result.body)
    except orjson.JSONDecodeError:
        return None
    return result.body if isinstance(whole, dict) and is_complete(whole) else None


async def _wait(waiting: asyncio.Future[bytes | None], timeout_s: float) -> bytes | None:
    try:
        return await asyncio.wait_for(asyncio.shield(waiting), timeout_s)
    except TimeoutError:
        return None


async def _iterate(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
