"""The intermediate-result cache other stages use: summaries, embeddings, outlines,
sub-answers. Same store, same tenant scoping, same fail-open behaviour as the result cache.

    cache = IntermediateCache(services.cache)
    outline = await cache.get_or_compute(ctx.tenant, "outline", [model, question], make_outline)
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from leangate.cache.keys import scope_prefix
from leangate.cache.services import CacheServices
from leangate.cache.store import StoreError

NAMESPACE = "intermediate"


class IntermediateCache:
    def __init__(self, cache: CacheServices, *, ttl_s: float = 3600.0) -> None:
        self._cache = cache
        self._ttl_s = ttl_s

    @staticmethod
    def key(tenant: str, kind: str, parts: Any) -> str:
        digest = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()
        return f"{scope_prefix(tenant, NAMESPACE)}{kind}:{digest}"

    async def get(self, tenant: str, kind: str, parts: Any) -> Any | None:
        """The stored value, or None when absent or when the store is unavailable."""
        try:
            raw = await self._cache.breaker.call(
                self._cache.store.get(self.key(tenant, kind, parts))
            )
        except StoreError:  # logged by the breaker, once per outage
            self._cache.metrics.cache_errors.labels("intermediate-get").inc()
            return None
        return None if raw is None else orjson.loads(raw)

    async def put(
        self, tenant: str, kind: str, parts: Any, value: Any, ttl_s: float | None = None
    ) -> None:
        key = self.key(tenant, kind, parts)
        write = self._cache.store.set(key, orjson.dumps(value), ttl_s or self._ttl_s)
        self._cache.in_background(self._cache.breaker.call(write), "intermediate-put")

    async def get_or_compute(
        self,
        tenant: str,
        kind: str,
        parts: Any,
        compute: Callable[[], Awaitable[Any]],
        ttl_s: float | None = None,
    ) -> Any:
        found = await self.get(tenant, kind, parts)
        if found is not None:
            return found
        value = await compute()
        await self.put(tenant, kind, parts, value, ttl_s)
        return value
