"""Purging cached entries by tenant and/or namespace (admin API and CLI)."""

from __future__ import annotations

from leangate.cache.keys import SEMANTIC_EVENTS, scope_prefix
from leangate.cache.store import Store

BATCH = 500


async def purge(store: Store, *, tenant: str | None, namespace: str | None) -> int:
    """Delete every entry of ``tenant`` and/or ``namespace``; returns how many.

    Semantic entries are announced as deleted so every replica drops them from its index.
    """
    if tenant is None and namespace is None:
        raise ValueError("name a tenant, a namespace, or both")
    deleted = 0
    batch: list[str] = []
    async for key in store.scan(scope_prefix(tenant, namespace) + "*"):
        batch.append(key)
        if len(batch) >= BATCH:
            deleted += await _delete(store, batch)
            batch = []
    return deleted + await _delete(store, batch)


async def _delete(store: Store, keys: list[str]) -> int:
    count = await store.delete(*keys)
    for key in keys:
        if ":sem:" in key:
            await store.publish(SEMANTIC_EVENTS, "del", key)
    return count
