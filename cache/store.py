"""Where cached bytes live: Redis (shared by every replica) or the proxy's own memory.

Both stores offer the same small async interface: values with a TTL, key scans for purges,
a sorted index for size bounds, and an append-only event log through which replicas tell
each other about semantic entries. Redis is the source of truth; the in-memory store is the
embedded default for a single proxy without Redis.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

EVENTS_MAXLEN = 100_000


class StoreError(Exception):
    """The store could not be reached or answered with an error."""


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    op: str
    key: str


class Store(ABC):
    kind: str
    """``redis`` or ``memory``, for /health."""

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    @abstractmethod
    async def delete(self, *keys: str) -> int: ...

    @abstractmethod
    async def exists(self, keys: list[str]) -> list[bool]: ...

    @abstractmethod
    def scan(self, pattern: str) -> AsyncIterator[str]: ...

    @abstractmethod
    async def index_add(self, index: str, member: str, score: float) -> int:
        """Add to a sorted index; returns the index's size."""

    @abstractmethod
    async def index_pop_oldest(self, index: str, count: int) -> list[str]: ...

    @abstractmethod
    async def publish(self, stream: str, op: str, key: str) -> None: ...

    @abstractmethod
    async def last_event_id(self, stream: str) -> str: ...

    @abstractmethod
    async def read_events(self, stream: str, after: str, block_ms: int) -> list[Event]:
        """Events after ``after``, waiting up to ``block_ms`` for the first one."""

    async def close(self) -> None:  # noqa: B027
        pass


class RedisStore(Store):
    """redis-py's asyncio client; every Redis failure surfaces as ``StoreError``.

    Short socket timeouts keep a slow Redis from holding requests: the cache stage's time
    budget is the real limit, and the pool reconnects by itself once Redis is back.
    """

    kind = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        # redis-py's annotations cover its sync and async clients at once; Any keeps
        # mypy from insisting that awaited results may be plain values.
        self._redis: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=10,
            max_connections=256,
        )
        self._blocking: Any = aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s)

    async def get(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self._redis.get(key)
        except RedisError as exc:
            raise StoreError(str(exc)) from exc
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self._redis.set(key, value, px=max(int(ttl_s * 1000), 1))
        except RedisError as exc:
            raise StoreError(str(exc)) from exc

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        try:
            return int(await self._redis.delete(*keys))
        except RedisError as exc:
            raise StoreError(str(exc)) from exc

    async def exists(self, keys: list[str]) -> list[bool]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                return [bool(found) for found in await pipe.execute()]
        except RedisError as exc:
            raise StoreError(str(exc)) from exc

    async def scan(self, pattern: str) -> AsyncIterator[str]:
        try:
            async for key in self._redis.scan_iter(match=pattern, count=1000):
                yield key.decode() if isinstance(key, bytes) else str(key)
        except RedisError as exc:
            raise StoreError(str(exc)) from exc

    async def index_add(self, index: str, member: str, score: float) -> int:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(index, {member: score})
                pipe.zcard(index)
                _, size = await pipe.execute()
        except RedisError as exc:
            raise StoreError(str(exc)) from exc
        return int(size)

    async def index_pop_oldest(self, index: str, count: int) -> list[str]:
        try:
            popped = await self._redis.zpopmin(index, count)
        except RedisError as exc:
            raise StoreError(str(exc)) from exc
        return [m.decode() if isinstance(m, bytes) else str(m) for m, _ in popped]

    async def publish(self, stream: str, op: str, key: str) -> None:
        try:
            await self._redis.xadd(
                stream, {"op": op, "key": key}, maxlen=EVENTS_MAXLEN, approximate=True
            )
        except RedisError as exc:
            raise StoreError(str(exc)) from exc

    async def last_event_id(self, stream: str) -> str:
        try:
            last = await self._redis.xrevrange(stream, count=1)
        except RedisError as exc:
            raise StoreError(str(exc)) from exc
        return _text(last[0][0]) if last else "0-0"

    async def read_events(self, stream: str, after: str, block_ms: int) -> list[Event]:
        try:
            answer = await self._blocking.xread({stream: after}, count=500, block=block_ms)
        except RedisError as exc:
            raise StoreError(str(exc)) from exc
        events = []
        for _, entries in answer or []:
            for event_id, fields in entries:
                op, key = fields.get(b"op", b""), fields.get(b"key", b"")
                events.append(Event(_text(event_id), _text(op), _text(key)))
        return events

    async def close(self) -> None:
        await self._redis.aclose()
        await self._blocking.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class MemoryStore(Store):
    """The embedded default: the same interface in this process's memory."""

    kind = "memory"

    def __init__(self) -> None:
        self._values: dict[str, tuple[bytes, float]] = {}
        self._indexes: dict[str, dict[str, float]] = {}
        self._events: dict[str, list[Event]] = {}
        self._counter = itertools.count(1)
        self._new_event = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        found = self._values.get(key)
        if found is None:
            return None
        if found[1] < time.monotonic():
            del self._values[key]
            return None
        return found[0]

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._values[key] = (value, time.monotonic() + ttl_s)

    async def delete(self, *keys: str) -> int:
        return sum(self._values.pop(k, None) is not None for k in keys)

    async def exists(self, keys: list[str]) -> list[bool]:
        return [await self.get(key) is not None for key in keys]

    async def scan(self, pattern: str) -> AsyncIterator[str]:
        now = time.monotonic()
        for key, (_, expires) in list(self._values.items()):
            if expires >= now and fnmatch.fnmatchcase(key, pattern):
                yield key

    async def index_add(self, index: str, member: str, score: float) -> int:
        entries = self._indexes.setdefault(index, {})
        entries[member] = score
        return len(entries)

    async def index_pop_oldest(self, index: str, count: int) -> list[str]:
        entries = self._indexes.get(index, {})
        oldest = sorted(entries, key=entries.__getitem__)[:count]
        for member in oldest:
            del entries[member]
        return oldest

    async def publish(self, stream: str, op: str, key: str) -> None:
        self._events.setdefault(stream, []).append(Event(f"{next(self._counter)}-0", op, key))
        self._new_event.set()
        self._new_event = asyncio.Event()

    async def last_event_id(self, stream: str) -> str:
        events = self._events.get(stream)
        return events[-1].id if events else "0-0"

    async def read_events(self, stream: str, after: str, block_ms: int) -> list[Event]:
        def newer() -> list[Event]:
            seq = int(after.split("-")[0])
            return [e for e in self._events.get(stream, []) if int(e.id.split("-")[0]) > seq]

        found = newer()
        if not found and block_ms > 0:
            waiter = self._new_event
            try:
                await asyncio.wait_for(waiter.wait(), block_ms / 1000)
            except TimeoutError:
                return []
            found = newer()
        return found


def open_store(redis_url: str | None) -> Store:
    return RedisStore(redis_url) if redis_url else MemoryStore()
