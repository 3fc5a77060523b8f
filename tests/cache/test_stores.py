"""Both stores behind the same interface: the intermediate cache, purges, and the
semantic index's consistency with the store. Redis is the real one."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from conftest import free_port, start_redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from leangate.cache.embedder import Embedding
from leangate.cache.intermediate import IntermediateCache
from leangate.cache.purge import purge
from leangate.cache.semantic import Entry, SemanticCache, SemanticSettings
from leangate.cache.services import CacheServices
from leangate.cache.store import (
    READ_COUNT,
    IdleClosingPool,
    MemoryStore,
    MemoryStoreSettings,
    RedisStore,
    Store,
    StoreError,
    redis_client,
)
from leangate.middleware.metrics import Metrics


@pytest.fixture(params=["redis", "memory"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Store]:
    opened: Store = RedisStore(redis_url) if request.param == "redis" else MemoryStore()
    yield opened
    await opened.close()


async def test_intermediate_results_are_computed_once_per_tenant(store: Store) -> None:
    cache = CacheServices(store, Metrics())
    intermediate = IntermediateCache(cache)
    calls: list[str] = []
    parts = ["outline", uuid.uuid4().hex]

    async def compute() -> dict[str, list[str]]:
        calls.append("computed")
        return {"points": ["a", "b"]}

    first = await intermediate.get_or_compute("alpha", "outline", parts, compute)
    await cache.drain()
    second = await intermediate.get_or_compute("alpha", "outline", parts, compute)
    assert first == second == {"points": ["a", "b"]}
    assert calls == ["computed"]
    await intermediate.get_or_compute("beta", "outline", parts, compute)
    assert len(calls) == 2, "another tenant never sees alpha's result"
    await cache.drain()
    assert await purge(store, tenant="alpha", namespace=None) >= 1
    assert await intermediate.get("alpha", "outline", parts) is None
    assert await intermediate.get("beta", "outline", parts) == {"points": ["a", "b"]}


def _embedding(seed: int) -> Embedding:
    vector = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    vector /= np.linalg.norm(vector)
    tokens = np.ones((1, 384), dtype=np.float16) / np.sqrt(384)
    return Embedding(vector, tokens)


class _NoModel:
    """Stands in for the embedder: these tests add vectors directly."""

    dim = 384

    def load(self) -> None:
        pass

    def encode(self, texts: list[str]) -> list[Embedding]:
        return [_embedding(0) for _ in texts]


async def test_semantic_index_follows_expiry_and_other_replicas(store: Store) -> None:
    first = SemanticCache(store, _NoModel())  # type: ignore[arg-type]
    second = SemanticCache(store, _NoModel())  # type: ignore[arg-type]
    await first.start()
    await second.start()
    try:
        tag = uuid.uuid4().hex
        short, lasting = f"lg:t:{tag}:sem:short", f"lg:t:{tag}:sem:lasting"
        # Long enough for the other replica to load it on a busy machine, short enough
        # to wait out.
        await first.add(short, Entry("scope", "q1", "a1"), _embedding(1), ttl_s=1.5)
        await first.add(lasting, Entry("scope", "q2", "a2"), _embedding(2), ttl_s=60)
        for _ in range(50):
            if short in second.index and lasting in second.index:
                break
            await asyncio.sleep(0.05)
        assert short in second.index and lasting in second.index, "the other replica saw both"
        await asyncio.sleep(1.6)
        assert await second.sweep() >= 1
        assert short not in second.index and lasting in second.index
        await first.drop(lasting)
        for _ in range(50):
            if lasting not in second.index:
                break
            await asyncio.sleep(0.05)
        assert lasting not in second.index, "a drop reaches every replica"
    finally:
        await first.close()
        await second.close()


async def test_an_announced_add_stores_tells_and_indexes(store: Store) -> None:
    tag = uuid.uuid4().hex
    stream, index = f"lg:test:{tag}:events", f"lg:test:{tag}:index"
    first, second = f"lg:test:{tag}:a", f"lg:test:{tag}:b"
    after = await store.last_event_id(stream)
    try:
        for size, key in enumerate((first, second), start=1):
            added = await store.add_announced(
                key, key.encode(), 60, stream=stream, index=index, score=size
            )
            assert added == size
        assert await store.get(second) == second.encode()
        events = await store.read_events(stream, after, 100)
        assert [(e.op, e.key) for e in events] == [("add", first), ("add", second)]
        assert await store.index_pop_oldest(index, 1) == [first]
    finally:
        await store.delete(stream, index, first, second)


class _Refusing(MemoryStore):
    async def add_announced(self, *args: object, **kwargs: object) -> int:
        raise StoreError("down")


async def test_a_semantic_entry_the_store_refused_is_not_served() -> None:
    semantic = SemanticCache(_Refusing(), _NoModel())  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        await semantic.add("lg:t:x:sem:k", Entry("scope", "q", "a"), _embedding(1), ttl_s=60)
    assert "lg:t:x:sem:k" not in semantic.index and len(semantic) == 0


def test_purge_command(redis_url: str) -> None:
    async def seed() -> None:
        redis_store = RedisStore(redis_url)
        cache = CacheServices(redis_store, Metrics())
        await IntermediateCache(cache).put("cli-tenant", "k", [1], {"v": 1})
        await cache.drain()
        await redis_store.close()

    asyncio.run(seed())
    run = [sys.executable, "-m", "leangate", "cache", "purge", "--redis-url", redis_url]
    done = subprocess.run(
        [*run, "--tenant", "cli-tenant"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "deleted 1 entries" in done.stdout, done.stderr
    refused = subprocess.run(run, capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "name a tenant" in refused.stderr


async def test_semantic_cache_starts_once_redis_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("leangate.cache.services.SEMANTIC_RETRY_S", 0.2)
    monkeypatch.setattr("leangate.cache.embedder.Embedder", _NoModel)
    port = free_port()
    metrics = Metrics()
    cache = CacheServices(RedisStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.2), metrics)
    await cache.start_semantic()
    assert cache.semantic() is None, "no Redis: no semantic cache, and no exception either"
    failures = metrics.registry.get_sample_value(
        "leangate_cache_errors_total", {"operation": "semantic-start"}
    )
    assert failures == 1
    redis_process = start_redis(port, tmp_path)
    try:
        ready = None
        for _ in range(100):
            ready = cache.semantic()
            if ready is not None:
                break
            await asyncio.sleep(0.1)
        assert ready is not None, "the semantic cache started once Redis was back"
    finally:
        await cache.close()
        redis_process.kill()
        redis_process.wait()


# --- the in-process store's bounds -----------------------------------------------------------


@pytest.mark.timeout(300)
async def test_memory_store_holds_its_bounds_under_a_million_inserts() -> None:
    bounds = MemoryStoreSettings(max_bytes=1_000_000, max_entries=3_000, max_events=1_000)
    store = MemoryStore(bounds)
    for n in range(1_000_000):
        await store.set(f"lg:t:n:ans:{n}", b"%d" % n, ttl_s=3600)
        if n % 50_000 == 0:
            assert store.entries <= bounds.max_entries
            assert store.bytes_used <= bounds.max_bytes
    assert store.entries == bounds.max_entries, "the entry bound, not the byte bound, binds here"
    assert await store.get("lg:t:n:ans:999999") == b"999999"
    assert await store.get("lg:t:n:ans:0") is None, "the least recently used went first"
    big = b"x" * 10_000
    for n in range(1_000):
        await store.set(f"big:{n}", big, ttl_s=3600)
    assert store.bytes_used <= bounds.max_bytes and store.entries < 100, "the byte bound binds"
    assert await store.get("big:999") == big


async def test_memory_store_expires_on_write_too() -> None:
    store = MemoryStore()
    for n in range(100):
        await store.set(f"short:{n}", b"v", ttl_s=0.05)
    await asyncio.sleep(0.06)
    await store.set("other", b"w", ttl_s=60)
    assert store.entries == 1, "expired values went without anybody reading them"


async def test_memory_event_log_is_capped_and_read_from_its_end() -> None:
    store = MemoryStore(MemoryStoreSettings(max_events=100_000))
    for n in range(150_000):
        await store.publish("ev", "add", f"k{n}")
    first = await store.read_events("ev", "0-0", block_ms=0)
    assert first[0].key == "k50000", "only the newest 100,000 events are kept"
    assert len(first) == READ_COUNT
    last = await store.last_event_id("ev")
    await store.publish("ev", "del", "k-new")
    started = time.perf_counter()
    for _ in range(1_000):
        newer = await store.read_events("ev", last, block_ms=0)
    elapsed = time.perf_counter() - started
    assert [(e.op, e.key) for e in newer] == [("del", "k-new")]
    assert elapsed < 1.0, f"1,000 reads of the newest event took {elapsed:.2f} s"


async def test_memory_sorted_index_is_bounded() -> None:
    store = MemoryStore(MemoryStoreSettings(max_entries=10))
    for n in range(100):
        assert await store.index_add("ix", f"m{n}", float(n)) <= 10
    await store.index_add("ix", "m95", 1000.0)  # re-scored: now the newest
    assert await store.index_pop_oldest("ix", 3) == ["m90", "m91", "m92"]


async def test_semantic_entry_cap_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEANGATE_SEMANTIC_MAX_ENTRIES", "7")
    assert SemanticSettings().max_entries == 7
    semantic = SemanticCache(MemoryStore(), _NoModel(), SemanticSettings(max_entries=2))  # type: ignore[arg-type]
    keys = [f"lg:t:n:sem:{n}" for n in range(3)]
    for n, key in enumerate(keys):
        await semantic.add(key, Entry("scope", f"q{n}", f"a{n}"), _embedding(n), ttl_s=60)
    assert len(semantic) == 2 and keys[0] not in semantic.index, "the oldest went"
    assert [keys[1], keys[2]] == [k for k in keys if k in semantic.index]


async def _connections_named(redis_url: str, name: str) -> int:
    """Connections Redis has open from clients named ``name`` (its own count)."""
    admin = aioredis.Redis.from_url(redis_url)
    try:
        return sum(1 for c in await admin.client_list() if c.get("name") == name)
    finally:
        await admin.aclose()


async def test_redis_connections_left_idle_close_and_reopen_when_needed(redis_url: str) -> None:
    """A burst opens a connection per command at once; redis-py alone kept them all for
    the life of the process (``leangate bench load --soak``: 50 Redis sockets more than
    before the load, for good)."""
    name = f"lg-idle-{uuid.uuid4().hex[:8]}"
    client = redis_client(redis_url, timeout_s=2.0, idle_s=0.3, client_name=name)
    try:
        # Each BLPOP on an empty list holds its connection for 0.2 s: 12 at once.
        await asyncio.gather(*(client.blpop([f"{name}:empty"], timeout=0.2) for _ in range(12)))
        assert await _connections_named(redis_url, name) == 12
        started = time.monotonic()
        while await _connections_named(redis_url, name) > 0:
            assert time.monotonic() - started < 3.0, "idle connections were not closed"
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 0.2, "closed before they were idle for 0.3 s"
        await client.set(f"{name}:k", b"v", px=5000)
        assert await client.get(f"{name}:k") == b"v", "a closed connection reconnects"
        assert await _connections_named(redis_url, name) == 1
    finally:
        await client.aclose()


async def test_no_command_fails_while_idle_connections_are_swept(redis_url: str) -> None:
    """Sweeps every 20 ms among commands taking and returning connections: the sweep never
    closes one a command holds (no retry here, which would hide it)."""
    pool = IdleClosingPool.from_url(
        redis_url, idle_s=0.02, max_connections=16, retry=Retry(NoBackoff(), 0)
    )
    client = aioredis.Redis.from_pool(pool)
    key = f"lg-sweep-{uuid.uuid4().hex[:8]}"
    closed: list[int] = []

    async def worker(n: int) -> None:
        for i in range(40):
            await client.set(f"{key}:{n}", i, px=5000)
            assert await client.get(f"{key}:{n}") == str(i).encode()
            await asyncio.sleep(random.uniform(0.0, 0.04))

    async def sweeper() -> None:
        for _ in range(60):
            closed.append(await pool.close_idle())
            await asyncio.sleep(0.01)

    try:
        await asyncio.gather(sweeper(), *(worker(n) for n in range(6)))
    finally:
        await client.aclose()
    assert sum(closed) > 0, "connections were closed between commands"
