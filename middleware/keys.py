"""API keys kept in Redis, beside those of the policy file, so that they rotate without a
restart and every replica sees the same keys.

Only a key's SHA-256 digest is stored (a hash ``leangate:apikeys``: digest → tenant); the
key itself is shown once, when it is made. Lookups are remembered for ``remember_s``
(found and not found alike, in a bounded table), so a revoked key stops working on every
replica within that time and a flood of unknown keys costs Redis one lookup each per
period, not one per request.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from cachetools import TTLCache
from redis.exceptions import RedisError

from leangate.cache.store import StoreError
from leangate.middleware.errors import ProxyError

HASH = "leangate:apikeys"
KEY_PREFIX = "lg-"
NOT_FOUND = ""


class KeyStoreUnavailable(ProxyError):
    """Keys must be checked (``require_api_key``) and Redis cannot answer."""

    status_code = 503
    error_type = "service_unavailable"
    code = "key_store_unavailable"


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class KeyStore:
    def __init__(self, redis: Any, remember_s: float = 2.0, entries: int = 10_000) -> None:
        self._redis = redis
        self._seen: TTLCache[str, str] = TTLCache(maxsize=entries, ttl=remember_s)

    async def tenant_of(self, api_key: str) -> str | None:
        """The tenant ``api_key`` was made for, or None. Raises ``StoreError`` when Redis
        cannot answer (the caller decides whether that refuses the request)."""
        digest = key_digest(api_key)
        tenant = self._seen.get(digest)
        if tenant is None:
            try:
                found = await self._redis.hget(HASH, digest)
            except (RedisError, OSError) as exc:
                raise StoreError(str(exc) or type(exc).__name__) from exc
            tenant = found.decode() if found else NOT_FOUND
            self._seen[digest] = tenant
        return tenant or None

    async def create(self, tenant: str) -> tuple[str, str]:
        """A new key for ``tenant``: (the key, its digest). The key is not kept."""
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = key_digest(api_key)
        await self._redis.hset(HASH, digest, tenant)
        return api_key, digest

    async def revoke(self, digest: str) -> bool:
        """Forget the key with this digest; False if there was none."""
        self._seen.pop(digest, None)
        return bool(await self._redis.hdel(HASH, digest.lower()))

    async def listing(self, tenant: str | None = None) -> list[dict[str, str]]:
        """Every stored key's digest and tenant (optionally of one tenant)."""
        entries = await self._redis.hgetall(HASH)
        found = [{"sha256": d.decode(), "tenant": t.decode()} for d, t in entries.items()]
        return sorted(
            (e for e in found if tenant is None or e["tenant"] == tenant),
            key=lambda e: (e["tenant"], e["sha256"]),
        )
