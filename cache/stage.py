"""The result cache as a pipeline stage: exact and semantic hits, single-flight, storage.

A request is served from cache only when the policy deems it deterministic (temperature 0
or a fixed seed, by default). Answers are stored only when complete: a plain answer with
every choice finished, or a stream that reached ``[DONE]`` normally. Errors, streams cut
short, and ``n > 1`` (unless allowed) are never stored.
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

from leangate.backend.errors import BackendError, BackendProtocolError, BackendTimeout
from leangate.cache.keys import answer_key, exact_hash, semantic_key, semantic_parts
from leangate.cache.replay import assemble, is_complete, to_events
from leangate.cache.services import CacheServices
from leangate.cache.singleflight import Flight
from leangate.cache.store import StoreError
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
    """An entry's lifetime, unless the request asks for its own (``cache_ttl_s`` or the
    ``x-leangate-cache-ttl`` header), up to ``max_ttl_s``."""
    max_ttl_s: float = Field(7 * 86400.0, gt=0)
    """The most a request's own TTL may ask for."""
    exact: bool = True
    """Look up and store entries by the exact request."""
    semantic: bool = False
    """Also look up similar questions (embedded, searched, then checked by the ``verifier``)."""
    deterministic_only: bool = True
    """Serve and store only requests at temperature 0 or with a fixed seed."""
    allow_n: bool = False
    """Also cache requests with ``n > 1``."""
    singleflight: bool = True
    """Concurrent identical misses wait for one backend call and share its answer."""
    singleflight_wait_s: float = Field(300.0, gt=0)
    """How long a waiting request follows another's call before it makes its own."""
    verifier: VerifierSettings = Field(default_factory=VerifierSettings)
    """The semantic hit verifier's thresholds (``cache/verify.py``); tuned defaults."""


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
        self.services = services
        self.verifier = Verifier(settings.verifier)

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        if not self._cacheable(ctx):
            ctx.response_headers[CACHE_HEADER] = "bypass"
            return await call_next(ctx)
        controls = self._controls(ctx)
        request_hash = exact_hash(ctx)
        lookup = Lookup(answer_key(ctx, self.settings.namespace, request_hash), request_hash)
        if controls.read:
            hit = await self._lookup(ctx, lookup)
            if hit is not None:
                return hit
        ctx.response_headers[CACHE_HEADER] = "miss"
        if not (controls.read and self.settings.singleflight):
            return await self._fetch(ctx, call_next, lookup, controls, None)
        flight, leader = self.cache.singleflight.join(lookup.key)
        if leader:
            return await self._fetch(ctx, call_next, lookup, controls, flight)
        followed = await self._follow(ctx, flight)
        if followed is not None:
            return followed
        return await self._fetch(ctx, call_next, lookup, controls, None)

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
        ttl = (
            _positive(ctx.options.cache_ttl_s)
            or _positive(_float(ctx.headers.get(TTL_HEADER)))
            or self.settings.ttl_s
        )
        return Controls(
            read="no-cache" not in directives and "no-store" not in directives,
            write="no-store" not in directives,
            ttl_s=min(ttl, self.settings.max_ttl_s),
        )

    # --- reading -----------------------------------------------------------------------------

    async def _lookup(self, ctx: RequestContext, lookup: Lookup) -> Result | None:
        """A hit, or None; a store that fails is a miss (counted, and logged once per
        outage by the breaker), so that coalescing still works while Redis is away."""
        try:
            return await self._find(ctx, lookup)
        except StoreError:
            self.metrics.cache_errors.labels("lookup").inc()
            return None

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
        decoded = orjson.loads(answer)
        self._count_saved(decoded.get("usage"))
        if not ctx.stream:
            return JsonResult(answer)
        options = ctx.body.get("stream_options") or {}
        events = to_events(ctx.route, decoded, include_usage=bool(options.get("include_usage")))
        return StreamResult(_iterate(events))

    def _count_saved(self, usage: object) -> None:
        """A hit saves the backend the whole answer: the profile's time for its tokens."""
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            saved = self.services.profile.predict(prompt, completion)
            self.metrics.stage_saved(self.name, saved)

    # --- following ---------------------------------------------------------------------------

    async def _follow(self, ctx: RequestContext, flight: Flight) -> Result | None:
        """The leader's answer for a follower; None when the follower must fetch its own.

        A streamed follower of a streamed leader starts with the leader's first event and
        then follows live. Until the follower has an event, a failed leader costs it nothing
        but the wait: it falls back to its own backend call.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.singleflight_wait_s
        async with ctx.pause_budget():
            while not flight.done and not (ctx.stream and flight.events):
                if not await flight.changed(deadline - loop.time()):
                    return None
        if flight.answer is not None:
            return self._serve(ctx, flight.answer, "coalesced")
        if flight.done:
            return None
        ctx.response_headers[CACHE_HEADER] = "coalesced"
        options = ctx.body.get("stream_options") or {}
        events = _follow_live(
            flight, self.settings.singleflight_wait_s, bool(options.get("include_usage"))
        )
        return StreamResult(events)

    # --- writing -----------------------------------------------------------------------------

    async def _fetch(
        self,
        ctx: RequestContext,
        call_next: Handler,
        lookup: Lookup,
        controls: Controls,
        flight: Flight | None,
    ) -> Result:
        """The backend's answer (through the rest of the chain), stored once complete; a
        leader's (``flight``) is broadcast to its followers as it arrives.

        However the request ends, the flight ends: here for an error or a whole answer, in
        the stream's tee once read, and from the request's scope for a stream never read.
        """
        end = _Ending(self, ctx, lookup, controls, flight)
        try:
            result = await call_next(ctx)
        except BaseException as exc:
            end(None, failed=True, error=exc if isinstance(exc, Exception) else None)
            raise
        if isinstance(result, StreamResult):
            tee = _Tee(self, ctx, result.events, end)
            ctx.scope.defer(tee.abandon)
            return StreamResult(tee.events, result.headers)
        answer = _storable_json(result)
        end(answer, failed=answer is None)
        return result

    def _assemble(self, ctx: RequestContext, seen: list[bytes]) -> bytes | None:
        """A completed stream's whole answer, if it can be stored."""
        try:
            whole = assemble(ctx.route, seen)
        except ValueError:
            self.metrics.cache_errors.labels("assemble").inc()
            return None
        return orjson.dumps(whole) if whole is not None and is_complete(whole) else None

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


class _Ending:
    """What happens once a fetched answer is complete or abandoned, exactly once: the
    flight (if leading) ends, and a complete answer is stored in the background."""

    __slots__ = ("controls", "ctx", "flight", "lookup", "over", "stage")

    def __init__(
        self,
        stage: CacheStage,
        ctx: RequestContext,
        lookup: Lookup,
        controls: Controls,
        flight: Flight | None,
    ) -> None:
        self.stage, self.ctx, self.lookup = stage, ctx, lookup
        self.controls, self.flight = controls, flight
        self.over = False

    def __call__(
        self, answer: bytes | None, *, failed: bool, error: Exception | None = None
    ) -> None:
        if self.over:
            return
        self.over = True
        cache = self.stage.cache
        if self.flight is not None:
            cache.singleflight.finish(self.flight, answer, failed=failed, error=error)
        if answer is not None and self.controls.write:
            work = self.stage._store(self.ctx, self.lookup, answer, self.controls.ttl_s)
            cache.in_background(work, "store")


class _Tee:
    """Passes a stream's events on, keeps them (in the flight, for followers), and hands
    the whole answer on only if the stream completed.

    The events run after the guard returned, so this fails open by itself: an answer it
    cannot assemble is simply not stored. ``abandon`` is deferred to the request's scope:
    a response dropped before its body was read never runs the generator, so the scope
    ends the flight and closes the upstream stream (its backend connection) instead.
    """

    __slots__ = ("ctx", "end", "events", "stage", "started", "upstream")

    def __init__(
        self,
        stage: CacheStage,
        ctx: RequestContext,
        upstream: AsyncIterator[bytes],
        end: _Ending,
    ) -> None:
        self.stage, self.ctx, self.upstream, self.end = stage, ctx, upstream, end
        self.started = False
        self.events = self._run()

    async def _run(self) -> AsyncIterator[bytes]:
        self.started = True
        flight = self.end.flight
        seen: list[bytes] = [] if flight is None else flight.events
        keep = seen.append if flight is None else flight.push
        answer: bytes | None = None
        failed = True
        error: Exception | None = None
        try:
            async for payload in self.upstream:
                keep(payload)
                yield payload
            failed = False
            answer = self.stage._assemble(self.ctx, seen)
        except Exception as exc:
            error = exc
            raise
        finally:
            self.end(answer, failed=failed, error=error)
            await aclose_quietly(self.upstream)

    async def abandon(self) -> None:
        """End of the request: a no-op for a stream that was read to its end."""
        await aclose_quietly(self.events)
        if not self.started:
            self.end(None, failed=True)
            await close_unread(self.upstream)


async def close_unread(events: AsyncIterator[bytes]) -> None:
    """Close an event iterator that nobody iterated.

    ``aclose()`` on an async generator that never started does not run its body, so a
    ``finally`` there (the one releasing the backend connection) never runs either.
    Starting it and cancelling it at its first suspension does run it.
    """
    step = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)
    step.cancel()
    await asyncio.wait({step})
    if not step.cancelled():
        step.exception()  # retrieved, so that nothing is logged about it
    await aclose_quietly(events)


async def _follow_live(flight: Flight, wait_s: float, include_usage: bool) -> AsyncIterator[bytes]:
    """The leader's events, those already seen first, then each as it arrives."""
    sent = 0
    while True:
        events = flight.events
        while sent < len(events):
            payload = events[sent]
            sent += 1
            if include_usage or b'"usage"' not in payload:
                yield payload
            elif (trimmed := _without_usage(payload)) is not None:
                yield trimmed
        if flight.done:
            break
        if not await flight.changed(wait_s):
            raise BackendTimeout("the answer this request was coalesced with stalled")
    if flight.failed:
        raise _leader_failure(flight)


def _without_usage(payload: bytes) -> bytes | None:
    """A chunk without the usage its follower did not ask for (None: nothing left)."""
    chunk = orjson.loads(payload)
    if not isinstance(chunk, dict) or "usage" not in chunk:
        return payload
    if not chunk.get("choices"):
        return None
    del chunk["usage"]
    return orjson.dumps(chunk)


def _leader_failure(flight: Flight) -> Exception:
    """What a follower raises when the stream it follows failed: the leader's own error."""
    if isinstance(flight.error, BackendError):
        return copy.copy(flight.error)
    return BackendProtocolError("the answer this request was coalesced with was cut short")


def _storable_json(result: JsonResult) -> bytes | None:
    if result.status != 200:
        return None
    try:
        whole = orjson.loads(result.body)
    except orjson.JSONDecodeError:
        return None
    return result.body if isinstance(whole, dict) and is_complete(whole) else None


async def _iterate(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _positive(value: float | None) -> float | None:
    """``value`` if it is a usable lifetime (finite and above zero), else None."""
    return value if value is not None and math.isfinite(value) and value > 0 else None
