"""Redis killed and started again, or frozen and let go, while clients keep sending:
serving goes on without the cache, the cache comes back by itself, and only whole, right
answers are ever served or stored.

``tests/cache/test_result_cache.py::test_redis_killed_mid_run_then_recovers`` covers one
client, one request at a time, against vLLM. This adds what it does not: concurrency,
streams and plain answers mixed, an answer per request (a hit served for another request,
or cut short, would show), how long the cache takes to come back, what Redis holds
afterwards, and a Redis that hangs instead of dying.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ProxyThread, free_port, proxy_settings, start_redis, wait_for, write_policy
from fault_helpers import Responder, chat, events, streamed_text

from leangate.cache.store import RedisStore, StoreError
from leangate.retrieval.chunkstore import RedisChunkStore

CACHED = """
rules:
  - name: cached
    stages: [{use: cache}]
"""
QUESTIONS = 24
CLIENTS = 6


def _answer(i: int) -> str:
    """Question ``i``'s answer: its own, and long (about 16 KB) so that Redis is killed
    while some are being written."""
    return f"Answer {i}: " + " ".join(f"w{i}.{n}" for n in range(2000))


@dataclass(frozen=True, slots=True)
class Outcome:
    started: float
    ended: float
    cache: str
    error: str | None


def _ask(http: httpx.Client, url: str, i: int, stream: bool) -> Outcome:
    started = time.monotonic()
    body = chat(f"Question {i}?", temperature=0, stream=stream, responder={"text": _answer(i)})
    error: str | None = None
    try:
        answer = http.post(url, json=body)
        cache = answer.headers.get("x-leangate-cache", "")
        if answer.status_code != 200:
            error = f"HTTP {answer.status_code}: {answer.text[:200]}"
        elif stream:
            payloads = events(answer.text)
            if payloads[-1] != "[DONE]" or streamed_text(payloads[:-1]) != _answer(i):
                error = f"stream of question {i} not whole or not its own ({cache})"
        elif answer.json()["choices"][0]["message"]["content"] != _answer(i):
            error = f"answer to question {i} not whole or not its own ({cache})"
    except httpx.HTTPError as exc:
        cache, error = "", repr(exc)
    return Outcome(started, time.monotonic(), cache, error)


def _stored_answers(redis_url: str) -> list[dict[str, object]]:
    store = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(store.get(key) or b"null") for key in store.scan_iter("lg:*:ans:*")]
    finally:
        store.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_redis_killed_or_frozen_then_back_under_load(tmp_path: Path, fault: str) -> None:
    """``killed``: SIGKILL, then a new, empty Redis on the same port; ``frozen``: SIGSTOP,
    then SIGCONT (a hung Redis: connections stay open and nothing answers)."""
    port = free_port()
    redis_process = start_redis(port, tmp_path)
    redis_url = f"redis://127.0.0.1:{port}/0"
    policy = write_policy(tmp_path, CACHED)
    served: list[Outcome] = []
    stop = threading.Event()
    try:
        with (
            Responder(free_port()) as backend,
            ProxyThread(proxy_settings(backend.url, policy=policy, redis_url=redis_url)) as proxy,
            ThreadPoolExecutor(CLIENTS) as pool,
        ):
            url = proxy.url + "/v1/chat/completions"

            def client(seed: int) -> None:
                with httpx.Client(timeout=30) as http:
                    n = seed
                    while not stop.is_set():
                        n += 1
                        served.append(_ask(http, url, n % QUESTIONS, stream=n % 3 == 0))

            def hit_since(moment: float) -> list[Outcome]:
                return [s for s in served if s.cache == "hit-exact" and s.started > moment]

            clients = [pool.submit(client, seed * 7) for seed in range(CLIENTS)]
            wait_for(lambda: bool(hit_since(0)), 20, "no hit before Redis was killed")
            killed = time.monotonic()
            if fault == "killed":
                redis_process.kill()
                redis_process.wait()
            else:
                redis_process.send_signal(signal.SIGSTOP)
            time.sleep(2)
            restarted = time.monotonic()
            if fault == "killed":
                redis_process = start_redis(port, tmp_path)
            else:
                redis_process.send_signal(signal.SIGCONT)
            wait_for(lambda: bool(hit_since(restarted)), 20, "the cache never came back")
            back = min(s.ended for s in hit_since(restarted))
            time.sleep(0.5)
            stop.set()
            for done in clients:
                done.result(timeout=60)
            stored = _stored_answers(redis_url)
    finally:
        stop.set()
        redis_process.send_signal(signal.SIGCONT)
        redis_process.kill()
        redis_process.wait()

    failures = [s.error for s in served if s.error]
    assert not failures, f"{len(failures)} of {len(served)} failed: {failures[:3]}"
    outage = [s for s in served if killed + 0.5 < s.started and s.ended < restarted]
    assert len(outage) >= CLIENTS, "serving went on without Redis"
    assert not [s for s in outage if s.cache.startswith("hit")], "no hit from a dead Redis"
    assert max(s.ended - s.started for s in outage) < 2.0, "a dead Redis costs no time"
    assert back - restarted < 8, f"the cache came back {back - restarted:.1f} s after Redis"
    # What Redis holds now is only whole answers, each its own question's.
    assert stored, "answers were stored again after the restart"
    answers = {_answer(i) for i in range(QUESTIONS)}
    for whole in stored:
        choice = whole["choices"][0]  # type: ignore[index]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] in answers


async def test_a_restarted_redis_costs_no_failed_call(tmp_path: Path) -> None:
    """Every pooled connection is stale once Redis restarts; each is replaced on its first
    use instead of failing the call (which would reopen the breaker, once per connection)."""
    port = free_port()
    redis_process = start_redis(port, tmp_path)
    store = RedisStore(f"redis://127.0.0.1:{port}/0")
    try:
        await asyncio.gather(*(store.set(f"k{n}", b"v", ttl_s=60) for n in range(20)))
        redis_process.kill()
        redis_process.wait()
        with pytest.raises(StoreError):
            await store.get("k0")
        redis_process = start_redis(port, tmp_path)
        assert await asyncio.gather(*(store.get(f"k{n}") for n in range(20))) == [None] * 20
    finally:
        await store.close()
        redis_process.kill()
        redis_process.wait()


async def test_a_restarted_redis_costs_the_corpus_store_no_failed_call(tmp_path: Path) -> None:
    """The corpora's Redis client is the cache's (``redis_client``): its stale connections
    are replaced on first use too. Before, each failed one call: a 503 on the corpus
    routes, or a corpus search left out of a RAG answer."""
    port = free_port()
    redis_process = start_redis(port, tmp_path)
    store = RedisChunkStore(f"redis://127.0.0.1:{port}/0", dim=4, timeout_s=1.0)
    try:
        assert await asyncio.gather(*(store.infos(f"t{n}") for n in range(20))) == [[]] * 20
        redis_process.kill()
        redis_process.wait()
        with pytest.raises(redis.ConnectionError):
            await store.infos("t0")
        redis_process = start_redis(port, tmp_path)
        versions = await asyncio.gather(*(store.version(f"t{n}", "kb") for n in range(20)))
        assert versions == [None] * 20
    finally:
        await store.aclose()
        redis_process.kill()
        redis_process.wait()
