"""The cache's shared resources: the store, a circuit breaker, single-flight, and the
semantic cache, which loads its embedding model only once a policy asks for it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from leangate.cache.singleflight import SingleFlight
from leangate.cache.store import Store, StoreError
from leangate.middleware.metrics import Metrics

if TYPE_CHECKING:
    from leangate.cache.embedder import Embedder
    from leangate.cache.semantic import SemanticCache, SemanticSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

SEMANTIC_RETRY_S = 5.0


class StoreUnavailable(StoreError):
    """The breaker is open: the store failed recently and is left alone for a moment."""


class Breaker:
    """Skips the store for a while after it fails, so that a dead Redis costs requests
    nothing; the next call after the pause tries again (and the client reconnects).

    The breaker alone logs store failures: a warning when it opens after the store worked,
    and nothing more until a call succeeds again, so a dead Redis logs once per outage,
    not once per request.
    """

    def __init__(self, pause_s: float = 1.0, max_pause_s: float = 5.0) -> None:
        self._base = pause_s
        self._max = max_pause_s
        self._pause = pause_s
        self._retry_at = 0.0
        self._failing = False

    @property
    def open(self) -> bool:
        return time.monotonic() < self._retry_at

    async def call(self, operation: Awaitable[T]) -> T:
        if self.open:
            close = getattr(operation, "close", None)
            if close is not None:
                close()
            raise StoreUnavailable("the cache store is paused after a failure")
        try:
            result = await operation
        except StoreError as exc:
            if not self._failing:
                log.warning("the cache store failed (%s); requests go on without it", exc)
                self._failing = True
            self._retry_at = time.monotonic() + self._pause
            self._pause = min(self._pause * 2, self._max)
            raise
        if self._failing:
            log.info("the cache store is back")
            self._failing = False
        self._pause = self._base
        return result


class CacheServices:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        embedder: Embedder | None = None,
        *,
        semantic_settings: SemanticSettings | None = None,
    ) -> None:
        """``semantic_settings`` default to the environment's (``LEANGATE_SEMANTIC_*``)."""
        self.store = store
        self._semantic_settings = semantic_settings
        self.metrics = metrics
        self.breaker = Breaker()
        self.singleflight = SingleFlight()
        self._semantic: SemanticCache | None = None
        self._starting: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._embedder = embedder
        self._semantic_retry_at = 0.0

    def semantic(self) -> SemanticCache | None:
        """The semantic cache if it is ready, else None.

        The first call starts it in the background. A start that failed (Redis down at
        boot, say) is tried again on a call at least ``SEMANTIC_RETRY_S`` later, so the
        semantic cache comes back by itself, as the exact cache does.
        """
        task = self._starting
        if task is not None and not task.done():
            return None
        if task is not None and not task.cancelled() and task.exception() is None:
            return self._semantic
        if time.monotonic() < self._semantic_retry_at:
            return None
        self._starting = asyncio.create_task(self._start_semantic(), name="semantic-start")
        return None

    async def start_semantic(self) -> None:
        """Start the semantic cache now (from the lifespan, when a policy uses it); a
        failure is logged, never raised: requests then go on without it."""
        self.semantic()
        if self._starting is not None:
            await asyncio.wait({self._starting})

    async def _start_semantic(self) -> None:
        from leangate.cache.embedder import Embedder
        from leangate.cache.semantic import SemanticCache

        if self._embedder is None:
            self._embedder = Embedder()
        semantic = SemanticCache(self.store, self._embedder, self._semantic_settings)
        try:
            await semantic.start()
        except Exception:
            log.exception("the semantic cache could not start; retrying later")
            self.metrics.cache_errors.labels("semantic-start").inc()
            self._semantic_retry_at = time.monotonic() + SEMANTIC_RETRY_S
            await semantic.close()
            raise
        self._semantic = semantic

    def in_background(self, work: Awaitable[None], operation: str) -> None:
        """Run store writes off the request path; a failure is counted, and logged unless
        it is the store's (which the breaker logs, once per outage)."""

        async def run() -> None:
            try:
                await work
            except StoreError:
                self.metrics.cache_errors.labels(operation).inc()
            except Exception as exc:
                log.warning("cache %s failed: %r", operation, exc)
                self.metrics.cache_errors.labels(operation).inc()

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for pending background writes (shutdown, tests)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        if self._starting is not None:
            if not self._starting.done():
                self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._semantic is not None:
            await self._semantic.close()
        await self.store.close()
