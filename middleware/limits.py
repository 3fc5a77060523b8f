"""Per-tenant limits: request rate, tokens per minute, concurrent requests, and the size of
one request (body bytes, messages, ``max_tokens``).

Counters are shared by every proxy replica through Redis when one is configured (the
``limits`` library's sliding-window counters; concurrency is a sorted set of leases that
expire, so a replica that dies does not hold its slots for ever), and live in the process
otherwise. A limit store that fails is left alone for a moment and requests are admitted
(fail open, counted in ``leangate_limit_store_failures_total``): a dead Redis must not take
the service down with it.

Tokens are charged when a request is admitted, as OpenAI counts them: the prompt's
estimated tokens plus ``n`` times ``max_tokens`` (``DEFAULT_ANSWER_RESERVATION`` when the
request sets none). A cache hit is charged too: admission happens before anyone knows.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from leangate.backend.tokenizer import DEFAULT_CHARS_PER_TOKEN
from leangate.cache.services import Breaker, StoreUnavailable
from leangate.cache.store import StoreError
from leangate.middleware.context import RequestContext
from leangate.middleware.errors import InvalidRequest, PayloadTooLarge, ProxyError, RateLimited
from leangate.middleware.metrics import Metrics
from leangate.middleware.scope import RequestScope

T = TypeVar("T")

DEFAULT_ANSWER_RESERVATION = 512
"""Tokens charged for the answer of a request that sets no ``max_tokens``."""
LEASE_S = 900.0
"""How long a concurrency slot outlives a replica that died holding it (longer than the
longest request: the backend timeout is 600 s by default)."""
KEY_PREFIX = "leangate:limits"


class Limits(BaseModel):
    """A tenant's limits; ``None``: no limit. In a policy, ``limits`` sets every tenant's
    and a tenant's own ``limits`` overrides the fields it names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(None, gt=0)
    """Requests per minute (a sliding window); over it: 429 with ``Retry-After``."""
    tokens_per_minute: int | None = Field(None, gt=0)
    """Prompt tokens (estimated) plus the answer tokens asked for, per minute."""
    concurrent_requests: int | None = Field(None, gt=0)
    """Requests in flight at once, streams until their last event."""
    max_body_bytes: int | None = Field(None, gt=0)
    """At most the process-wide ``LEANGATE_MAX_BODY_BYTES``."""
    max_messages: int | None = Field(None, gt=0)
    """Most messages in one chat request; over it: 413 ``too_many_messages``."""
    max_tokens: int | None = Field(None, gt=0)
    """A ceiling on ``max_tokens``; a request without one gets this one."""

    def under(self, override: Limits | None) -> Limits:
        """These limits with the fields ``override`` sets replaced."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_unset=True))

    def or_none(self) -> Limits | None:
        """These limits, or None when they limit nothing."""
        return self if any(v is not None for v in self.model_dump().values()) else None

    @property
    def counted(self) -> bool:
        """Whether admitting a request touches a counter (else admission is free)."""
        return bool(self.requests_per_minute or self.tokens_per_minute or self.concurrent_requests)


class Limiter:
    """Admits a request under its tenant's limits or raises the error the client gets."""

    def __init__(self, metrics: Metrics, redis_url: str | None = None, redis: Any = None) -> None:
        storage: Storage
        if redis_url is not None and redis is not None:
            storage = RedisStorage(
                "async+" + redis_url,
                implementation="redispy",
                key_prefix=KEY_PREFIX,
                connection_pool=redis.connection_pool,  # closed with ``redis``, by its owner
            )
            self._slots: Slots = RedisSlots(redis)
        else:
            storage = MemoryStorage()
            self._slots = MemorySlots()
        self._windows = SlidingWindowCounterRateLimiter(storage)
        self._metrics = metrics
        self._breaker = Breaker()

    async def admit(self, ctx: RequestContext, limits: Limits) -> None:
        """Check ``ctx`` against ``limits``; a concurrency slot it takes is given back when
        the request's scope closes. Raises ``RateLimited`` (429), ``PayloadTooLarge``
        (413) or ``InvalidRequest`` (400)."""
        try:
            check_size(ctx, limits)
        except ProxyError as exc:
            self._metrics.limited.labels(exc.code or "size").inc()
            raise
        if limits.counted:
            await self.admit_call(ctx.tenant, limits, ctx.scope, lambda: tokens_charged(ctx))

    async def admit_call(
        self, tenant: str, limits: Limits, scope: RequestScope, cost: int | Callable[[], int]
    ) -> None:
        """Count one call of ``tenant`` against its rates, ``cost`` tokens (or a function
        that counts them, called only under a token limit), and take a concurrency slot,
        given back when ``scope`` closes. Raises ``RateLimited`` or ``PayloadTooLarge``."""
        if not limits.counted:
            return
        if limits.requests_per_minute:
            await self._hit("requests", tenant, limits.requests_per_minute, 1)
        if limits.tokens_per_minute:
            tokens = cost() if callable(cost) else cost
            if tokens > limits.tokens_per_minute:
                self._metrics.limited.labels("tokens_over_limit").inc()
                raise PayloadTooLarge(
                    f"this request alone counts {tokens} tokens, over the limit of "
                    f"{limits.tokens_per_minute} tokens per minute",
                    code="tokens_over_limit",
                )
            await self._hit("tokens", tenant, limits.tokens_per_minute, tokens)
        if limits.concurrent_requests:
            slots = self._slots.acquire(tenant, limits.concurrent_requests)
            release = await self._guarded(slots)
            if release is False:
                self._metrics.limited.labels("concurrent_requests").inc()
                raise RateLimited(
                    f"over the limit of {limits.concurrent_requests} concurrent requests",
                    retry_after_s=1,
                )
            if callable(release):
                scope.defer(release)

    async def _hit(self, kind: str, tenant: str, per_minute: int, cost: int) -> None:
        item = RateLimitItemPerMinute(per_minute)
        allowed = await self._guarded(self._windows.hit(item, kind, tenant, cost=cost))
        if allowed is not False:
            return
        self._metrics.limited.labels(f"{kind}_per_minute").inc()
        wait = await self._guarded(self._retry_after(item, kind, tenant))
        raise RateLimited(
            f"over the limit of {per_minute} {kind} per minute",
            retry_after_s=wait if isinstance(wait, int) else 1,
        )

    async def _retry_after(self, item: RateLimitItem, kind: str, tenant: str) -> int:
        stats = await self._windows.get_window_stats(item, kind, tenant)
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def _guarded(self, operation: Coroutine[Any, Any, T]) -> T | None:
        """``operation``'s result, or None when the store failed (the request is admitted)."""
        if self._breaker.open:
            operation.close()
            self._metrics.limit_store_failures.inc()
            return None
        try:
            return await self._breaker.call(_as_store_errors(operation))
        except (StoreError, StoreUnavailable):
            self._metrics.limit_store_failures.inc()
            return None


async def _as_store_errors(operation: Awaitable[T]) -> T:
    try:
        return await operation
    except (RedisError, OSError) as exc:
        raise StoreError(str(exc) or type(exc).__name__) from exc


def check_size(ctx: RequestContext, limits: Limits) -> None:
    """The limits one request meets on its own: messages and ``max_tokens``. A request
    without ``max_tokens`` gets the ceiling, so the backend stops there."""
    messages = ctx.body.get("messages")
    if limits.max_messages and isinstance(messages, list) and len(messages) > limits.max_messages:
        raise PayloadTooLarge(
            f"{len(messages)} messages, over the limit of {limits.max_messages}",
            code="too_many_messages",
        )
    ceiling = limits.max_tokens
    if ceiling is None:
        return
    asked = ctx.answer_cap(0)
    if not asked:
        ctx.replace_body({**ctx.body, "max_tokens": ceiling})
    elif asked > ceiling:
        raise InvalidRequest(
            f"max_tokens is {asked}, over this key's limit of {ceiling}",
            code="max_tokens_over_limit",
        )


def tokens_charged(ctx: RequestContext) -> int:
    """The prompt's estimated tokens and every answer's ``max_tokens``."""
    prompt = math.ceil(_prompt_chars(ctx.body) / DEFAULT_CHARS_PER_TOKEN)
    return prompt + (ctx.request.n or 1) * ctx.answer_cap(DEFAULT_ANSWER_RESERVATION)


def _prompt_chars(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
    return len(str(body.get("prompt") or ""))


# --- concurrency slots ----------------------------------------------------------------------

Release = Callable[[], Awaitable[None]]


class Slots:
    async def acquire(self, tenant: str, limit: int) -> Release | bool:
        """A release callback, or False when ``tenant`` already holds ``limit`` slots."""
        raise NotImplementedError


class MemorySlots(Slots):
    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    async def acquire(self, tenant: str, limit: int) -> Release | bool:
        held = self._held.get(tenant, 0)
        if held >= limit:
            return False
        self._held[tenant] = held + 1

        async def release() -> None:
            left = self._held.get(tenant, 1) - 1
            if left > 0:
                self._held[tenant] = left
            else:
                self._held.pop(tenant, None)

        return release


_ACQUIRE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t - tonumber(ARGV[1]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], t, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])))
return 1
"""


class RedisSlots(Slots):
    """Slots as members of a sorted set per tenant, scored by Redis's own clock (replicas'
    clocks may differ); members older than ``LEASE_S`` are dropped on the next acquire."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._acquire = redis.register_script(_ACQUIRE)

    async def acquire(self, tenant: str, limit: int) -> Release | bool:
        key = f"{KEY_PREFIX}:slots:{tenant}"
        member = uuid.uuid4().hex
        if not await self._acquire(keys=[key], args=[LEASE_S, limit, member]):
            return False

        async def release() -> None:
            with contextlib.suppress(RedisError, OSError):  # else the lease expires
                await self._redis.zrem(key, member)

        return release
