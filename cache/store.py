"""Where cached bytes live: Redis (shared by every replica) or the proxy's own memory.

Both stores offer the same small async interface: values with a TTL, key scans for purges,
a sorted index for size bounds, and an append-only event log through which replicas tell
each other about semantic entries. Redis is the source of truth; the in-memory store is the
embedded default for a single proxy without Redis.
"""

from __future__ import annotations

import asyncio
import fnmatch
import heapq
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from cachetools import Cache, TLRUCache
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 100_000
READ_COUNT = 500
"""Events returned by one read, at most (both stores)."""


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

    async def add_announced(
        self, key: str, value: bytes, ttl_s: float, *, stream: str, index: str, score: float
    ) -> int:
        """``set``, then ``publish`` an ``add`` of ``key`` on ``stream`` and ``index_add``
        it to ``index``; returns the index's size. Redis does the three in one round trip."""
        await self.set(key, value, ttl_s)
        await self.publish(stream, "add", key)
        return await self.index_add(index, key, score)

    @abstractmethod
    async def last_event_id(self, stream: str) -> str: ...

    @abstractmethod
    async def read_events(self, stream: str, after: str, block_ms: int) -> list[Event]:
        """Events after ``after``, waiting up to ``block_ms`` for the first one."""

    async def close(self) -> None:  # noqa: B027
        pass


# --- Redis connections -----------------------------------------------------------------------

REDIS_IDLE_S = 30.0
"""A pooled Redis connection unused this long is closed (it reconnects on its next use)."""
MIN_SWEEP_S = 1.0
"""The shortest wait between two sweeps (``idle_s`` if shorter): due ones close together."""


class IdleClosingPool(aioredis.BlockingConnectionPool):
    """A blocking pool that closes the connections left idle for ``idle_s``.

    redis-py never closes a pooled connection, so a pool keeps as many as were ever in use
    at once: after a burst at concurrency 256, 256 sockets for the life of the process
    (``leangate bench load --soak``: 52 Redis sockets, of 2 before it, 75 s after the
    load; 0 after 31 s with the sweep). A sweep, timed for when the least recently used
    idle connection is due (the pool hands out the most recently used first, so the
    others age), disconnects those unused for ``idle_s``. They stay in the pool,
    disconnected, and reconnect when next taken. The sweep holds the pool's condition, as
    taking and returning a connection do, so it never closes one a command has just taken.
    """

    def __init__(self, *, idle_s: float = REDIS_IDLE_S, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.idle_s = idle_s
        self._used: dict[AbstractConnection, float] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._sweeping: asyncio.Task[None] | None = None

    async def release(self, connection: AbstractConnection) -> None:
        self._used[connection] = time.monotonic()
        await super().release(connection)
        if self._sweep is None and self._sweeping is None:
            self._schedule(self.idle_s)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        await super().disconnect(inuse_connections)

    async def close_idle(self) -> int:
        """Disconnect the pooled connections unused for ``idle_s``; returns how many."""
        cutoff = time.monotonic() - self.idle_s
        async with self._condition:
            idle = [c for c in self._idle_connected() if self._used.get(c, cutoff) <= cutoff]
            for connection in idle:
                await connection.disconnect(nowait=True)
        return len(idle)

    def _idle_connected(self) -> list[AbstractConnection]:
        return [c for c in self._available_connections if c.is_connected]

    def _schedule(self, delay_s: float) -> None:
        self._sweep = asyncio.get_running_loop().call_later(delay_s, self._start_sweep)

    def _start_sweep(self) -> None:
        self._sweep = None
        self._sweeping = asyncio.get_running_loop().create_task(
            self._sweep_idle(), name="redis-idle-sweep"
        )

    async def _sweep_idle(self) -> None:
        """Close what is due, then wait for the next one due; with nothing connected left
        idle, the next connection returned starts the timer again."""
        try:
            await self.close_idle()
        except Exception as exc:  # a socket that fails to close is closed anyway
            log.debug("closing idle Redis connections failed: %r", exc)
        finally:
            self._sweeping = None
        now = time.monotonic()
        used = [self._used.get(c, now) for c in self._idle_connected()]
        if used and self._sweep is None:
            self._schedule(max(min(used) + self.idle_s - now, min(MIN_SWEEP_S, self.idle_s)))


def redis_client(
    url: str,
    *,
    timeout_s: float | None,
    connect_timeout_s: float | None = None,
    max_connections: int = 256,
    wait_s: float = 5.0,
    idle_s: float = REDIS_IDLE_S,
    **options: Any,
) -> Any:
    """An asyncio Redis client on an ``IdleClosingPool``: the proxy's one way to open one
    (the cache, keys and limits, corpora), so that all of them behave alike.

    * The pool waits up to ``wait_s`` for a free connection rather than failing: at 256
      requests at once, a pool that raised "too many connections" opened the cache's
      breaker and switched the cache off (``leangate bench load``: hit ratio 0.02 of a
      possible 0.48; 0.47 blocking).
    * A command that fails on a broken connection is sent once more, at once, on a new
      one. After a restart of Redis every pooled connection is stale and fails on its
      first use: without the retry each of them cost a failed call. A dead Redis still
      fails at once (the new connection is refused). Callers send only commands that may
      run twice, or say why it does no harm.
    * Connections unused for ``idle_s`` are closed (``IdleClosingPool``).

    ``options`` go to redis-py's connections (``health_check_interval``, ``client_name``).
    Returned as ``Any``: redis-py's annotations cover its sync and async clients at once,
    and mypy would insist that awaited results may be plain values.
    """
    pool = IdleClosingPool.from_url(
        url,
        idle_s=idle_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s if connect_timeout_s is None else connect_timeout_s,
        max_connections=max_connections,
        timeout=wait_s,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        **options,
    )
    return aioredis.Redis.from_pool(pool)


def _put(redis: Any, key: str, value: bytes, ttl_s: float) -> Any:
    """``SET`` with the TTL on a client (awaitable) or a pipeline (queued)."""
    return redis.set(key, value, px=max(int(ttl_s * 1000), 1))


def _announce(redis: Any, stream: str, op: str, key: str) -> Any:
    """``XADD`` of an event on a client (awaitable) or a pipeline (queued)."""
    return redis.xadd(stream, {"op": op, "key": key}, maxlen=EVENTS_MAXLEN, approximate=True)


class RedisStore(Store):
    """redis-py's asyncio client; every Redis failure surfaces as ``StoreError``.

    Its connections come from ``redis_client`` (a blocking pool of 256 that retries a
    command once on a stale connection and closes the connections left idle). Short
    socket timeouts keep a slow Redis from holding requests: the cache stage's time budget
    is the real limit, and the pool reconnects by itself once Redis is back.

    All commands here are idempotent but two, which run twice only if the connection
    broke after Redis ran them: ``publish`` (the event twice: followers ignore the repeat)
    and ``index_pop_oldest`` (more of the oldest semantic entries leave the bound's index
    than asked).
    """

    kind = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5, idle_s: float = REDIS_IDLE_S) -> None:
        self._redis: Any = redis_client(
            url, timeout_s=timeout_s, idle_s=idle_s, health_check_interval=10
        )
        # XREAD blocks for longer than any socket timeout; one follower uses it.
        self._blocking: Any = redis_client(
            url, timeout_s=None, connect_timeout_s=timeout_s, idle_s=idle_s
        )

    async def get(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self._redis.get(key)
        except RedisError as exc:
            raise StoreError(str(exc)) from exc
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await _put(self._redis, key, value, ttl_s)
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

    async def add_announced(
        self, key: str, value: bytes, ttl_s: float, *, stream: str, index: str, score: float
    ) -> int:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                _put(pipe, key, value, ttl_s)
                _announce(pipe, stream, "add", key)
                pipe.zadd(index, {key: score})
                pipe.zcard(index)
                *_, size = await pipe.execute()
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
            await _announce(self._redis, stream, op, key)
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
            answer = await self._blocking.xread({stream: after}, count=READ_COUNT, block=block_ms)
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


class MemoryStoreSettings(BaseSettings):
    """Bounds of the in-process store (``LEANGATE_MEMORY_STORE_*``).

    Values beyond a bound go least recently used first, as in a Redis with ``maxmemory``
    and ``allkeys-lru``; the event log keeps its newest events, like a capped stream.
    """

    model_config = SettingsConfigDict(env_prefix="LEANGATE_MEMORY_STORE_", extra="ignore")

    max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    """Values, keys and a per-entry overhead estimate, together."""
    max_entries: int = Field(100_000, gt=0)
    """Values, and members of each sorted index."""
    max_events: int = Field(EVENTS_MAXLEN, gt=0)
    """Events kept per stream."""


ENTRY_OVERHEAD_BYTES = 240
"""Roughly what one cached value costs beyond its key and value bytes (dict slots, the
cache's bookkeeping objects, a tuple)."""


class _Value(NamedTuple):
    data: bytes
    ttl_s: float
    size: int


def _expires(key: str, value: _Value, now: float) -> float:
    return now + value.ttl_s


def _size(value: _Value) -> int:
    return value.size


class _Values(TLRUCache[str, _Value]):
    """Per-value TTLs (expired values go on every write, not only when read), bounded by
    bytes through ``getsizeof`` and by count here."""

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        super().__init__(max_bytes, _expires, getsizeof=_size)
        self.max_entries = max_entries

    def __setitem__(self, key: str, value: _Value) -> None:
        super().__setitem__(key, value)  # expires what is due, then evicts by bytes
        while Cache.__len__(self) > self.max_entries:  # len() would sweep expiry again
            self.popitem()


class _SortedIndex:
    """A sorted set's members by score, with the oldest found through a heap (stale heap
    rows, left by re-scored or popped members, are skipped and compacted away)."""

    def __init__(self, max_members: int) -> None:
        self.scores: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._max = max_members

    def add(self, member: str, score: float) -> None:
        self.scores[member] = score
        heapq.heappush(self._heap, (score, member))
        if len(self._heap) > 2 * len(self.scores) + 64:
            self._heap = [(s, m) for m, s in self.scores.items()]
            heapq.heapify(self._heap)
        if len(self.scores) > self._max:
            self.pop_oldest(len(self.scores) - self._max)

    def pop_oldest(self, count: int) -> list[str]:
        popped: list[str] = []
        while self._heap and len(popped) < count:
            score, member = heapq.heappop(self._heap)
            if self.scores.get(member) == score:
                del self.scores[member]
                popped.append(member)
        return popped


class MemoryStore(Store):
    """The embedded default: the same interface in this process's memory, bounded."""

    kind = "memory"

    def __init__(self, settings: MemoryStoreSettings | None = None) -> None:
        self.settings = settings or MemoryStoreSettings()
        self._values = _Values(self.settings.max_bytes, self.settings.max_entries)
        self._indexes: dict[str, _SortedIndex] = {}
        self._events: dict[str, deque[tuple[int, Event]]] = {}
        self._counter = itertools.count(1)
        self._new_event = asyncio.Event()

    @property
    def entries(self) -> int:
        """Values held, expired ones included until a write sweeps them."""
        return Cache.__len__(self._values)

    @property
    def bytes_used(self) -> int:
        return int(self._values.currsize)

    async def get(self, key: str) -> bytes | None:
        found = self._values.get(key)
        return None if found is None else found.data

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        size = len(value) + len(key) + ENTRY_OVERHEAD_BYTES
        if size > self.settings.max_bytes:
            self._values.pop(key, None)  # larger than the whole store: not kept
            return
        self._values[key] = _Value(value, ttl_s, size)

    async def delete(self, *keys: str) -> int:
        return sum(self._values.pop(k, None) is not None for k in keys)

    async def exists(self, keys: list[str]) -> list[bool]:
        return [key in self._values for key in keys]

    async def scan(self, pattern: str) -> AsyncIterator[str]:
        for key in list(self._values):
            if fnmatch.fnmatchcase(key, pattern):
                yield key

    async def index_add(self, index: str, member: str, score: float) -> int:
        entries = self._indexes.get(index)
        if entries is None:
            entries = self._indexes[index] = _SortedIndex(self.settings.max_entries)
        entries.add(member, score)
        return len(entries.scores)

    async def index_pop_oldest(self, index: str, count: int) -> list[str]:
        entries = self._indexes.get(index)
        return [] if entries is None else entries.pop_oldest(count)

    async def publish(self, stream: str, op: str, key: str) -> None:
        events = self._events.get(stream)
        if events is None:
            events = self._events[stream] = deque(maxlen=self.settings.max_events)
        seq = next(self._counter)
        events.append((seq, Event(f"{seq}-0", op, key)))
        self._new_event.set()
        self._new_event = asyncio.Event()

    async def last_event_id(self, stream: str) -> str:
        events = self._events.get(stream)
        return events[-1][1].id if events else "0-0"

    async def read_events(self, stream: str, after: str, block_ms: int) -> list[Event]:
        found = self._newer(stream, after)
        if not found and block_ms > 0:
            waiter = self._new_event
            try:
                await asyncio.wait_for(waiter.wait(), block_ms / 1000)
            except TimeoutError:
                return []
            found = self._newer(stream, after)
        return found

    def _newer(self, stream: str, after: str) -> list[Event]:
        """Up to ``READ_COUNT`` events after ``after``, walking back from the newest only
        as far as needed (a follower that keeps up reads a handful, not the whole log)."""
        events = self._events.get(stream)
        if not events:
            return []
        seq = int(after.split("-")[0])
        newer = [event for _, event in itertools.takewhile(lambda e: e[0] > seq, reversed(events))]
        newer.reverse()
        return newer[:READ_COUNT]


def open_store(redis_url: str | None, memory: MemoryStoreSettings | None = None) -> Store:
    """Redis if a URL is given, else the bounded in-process store."""
    return RedisStore(redis_url) if redis_url else MemoryStore(memory)
