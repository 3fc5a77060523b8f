"""Backend faults on loopback, against the benchmark responder run as a process: a replica
killed mid-stream and mid-request, a slow backend, and clients that leave.

The proxy runs in a thread (``ProxyThread``) with its production transport (aiohttp), so
every fault reaches it as it would from a real vLLM: a reset connection, a refused one, a
server that does not answer in time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import (
    NO_STAGES,
    ProxyThread,
    free_port,
    posted_then_left,
    proxy_settings,
    wait_for,
    write_policy,
)
from fault_helpers import TEXT, Responder, chat, events, streamed_text

ADMIN = "sk-admin-faults"
PROMPT = "Tell me everything about lighthouses."
ERROR_FIELDS = {"message", "type", "code"}


def _replicas(proxy: ProxyThread, field: str = "healthy") -> dict[str, object]:
    """Each replica's health (or ``field``) as the proxy sees it."""
    answer = httpx.get(proxy.url + "/health", headers={"authorization": f"Bearer {ADMIN}"})
    return {r["url"]: r[field] for r in answer.json()["replicas"]}


def _assert_whole(answer: httpx.Response, stream: bool) -> None:
    assert answer.status_code == 200, answer.text
    if stream:
        payloads = events(answer.text)
        assert payloads[-1] == "[DONE]"
        assert streamed_text(payloads[:-1]) == TEXT
    else:
        assert answer.json()["choices"][0]["message"]["content"] == TEXT


@pytest.mark.timeout(90)
def test_a_replica_killed_mid_stream_and_mid_request(tmp_path: Path) -> None:
    """The killed replica's clients get an error, never an answer that looks whole; the
    next requests go to the other replica; with both down, 503; both back, served."""
    policy = write_policy(tmp_path, NO_STAGES)
    with Responder(free_port()) as a, Responder(free_port()) as b:
        settings = proxy_settings(f"{a.url},{b.url}", policy=policy, admin_api_key=ADMIN)
        with ProxyThread(settings) as proxy, ThreadPoolExecutor(1) as pool:
            url = proxy.url + "/v1/chat/completions"
            long = chat(PROMPT, stream=True, responder={"chunks": 400, "chunk_interval_ms": 50})
            slow = chat(PROMPT, responder={"delay_ms": 60_000})
            with httpx.stream("POST", url, json=long, timeout=30) as streamed:
                assert streamed.status_code == 200
                lines = (line for line in streamed.iter_lines() if line)
                assert next(lines).startswith("data: {")
                assert sorted([a.stats()["active"], b.stats()["active"]]) == [0, 1]
                victim, survivor = (a, b) if a.stats()["active"] else (b, a)
                plain = pool.submit(httpx.post, url, json=slow, timeout=30)
                # Same prompt, same replica (prefix affinity).
                wait_for(lambda: victim.stats()["active"] == 2, 15, "both not on one replica")
                victim.kill()
                rest = list(lines)
            answer = plain.result(timeout=15)

            payloads = [line.removeprefix("data: ") for line in rest]
            assert "[DONE]" not in payloads, "a stream cut short must not look complete"
            assert all(json.loads(p)["choices"] for p in payloads[:-1]), "whole events only"
            error = json.loads(payloads[-1])["error"]
            assert set(error) == ERROR_FIELDS and error["type"] == "bad_gateway"
            assert answer.status_code == 502, answer.text
            assert set(answer.json()["error"]) == ERROR_FIELDS

            streams_before = survivor.stats()["streams"]
            for i in range(8):  # half of them the victim's by affinity
                body = chat(PROMPT if i % 2 == 0 else f"Question {i}", stream=i % 3 == 0)
                _assert_whole(httpx.post(url, json=body, timeout=10), stream=i % 3 == 0)
            assert survivor.stats()["streams"] == streams_before + 3, "all went to the survivor"
            assert _replicas(proxy) == {victim.url: False, survivor.url: True}

            survivor.kill()
            down = httpx.post(url, json=chat(PROMPT), timeout=10)
            assert down.status_code == 503, down.text
            assert down.json()["error"]["type"] == "service_unavailable"
            assert httpx.get(proxy.url + "/health").status_code == 503

            started = time.monotonic()
            victim.start()
            survivor.start()
            # The next health round (every 5 s) takes both back.
            wait_for(lambda: all(_replicas(proxy).values()), 15, "the replicas never came back")
            recovered_s = time.monotonic() - started
            assert recovered_s < 8, f"recovered in {recovered_s:.1f} s"
            streamed_back = httpx.post(url, json=chat(PROMPT, stream=True), timeout=10)
            _assert_whole(streamed_back, stream=True)
            assert victim.stats()["streams"] == 1, "the prompt's own replica serves it again"
            outstanding = _replicas(proxy, "outstanding")
            assert outstanding == {a.url: 0, b.url: 0}, "every failed request was released"


@pytest.mark.timeout(60)
def test_a_slow_backend_times_out_with_a_504_and_its_work_is_dropped(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, NO_STAGES)
    with Responder(free_port()) as backend:
        settings = proxy_settings(backend.url, policy=policy, backend_timeout_s=1.0)
        with ProxyThread(settings) as proxy:
            url = proxy.url + "/v1/chat/completions"
            for stream in (False, True):  # nothing arrives in time: not even the headers
                started = time.monotonic()
                late = chat(PROMPT, stream=stream, responder={"delay_ms": 30_000})
                answer = httpx.post(url, json=late, timeout=30)
                assert time.monotonic() - started < 5
                assert answer.status_code == 504, answer.text
                error = answer.json()["error"]
                assert set(error) == ERROR_FIELDS and error["type"] == "timeout"

            # A stream that stalls after its first event: 1 s of silence ends it.
            pace = {"chunks": 5, "chunk_interval_ms": 30_000}
            stalled = chat(PROMPT, stream=True, responder=pace)
            answer = httpx.post(url, json=stalled, timeout=30)
            assert answer.status_code == 200
            payloads = events(answer.text)
            assert len(payloads) == 2 and "[DONE]" not in payloads
            assert json.loads(payloads[-1])["error"]["type"] == "timeout"

            wait_for(lambda: backend.stats()["active"] == 0, 5, "the backend still works on them")
            stats = backend.stats()
            assert stats["answers_cut"] == 1 and stats["streams_cut"] == 2, stats


FANOUT = """
rules:
  - name: fanout
    stages:
      - use: "leangate.bench.profile:FanoutProbe"
        settings: {count: 8, max_tokens: 16}
"""


@pytest.fixture
def fanout_policy(tmp_path: Path) -> Path:
    return write_policy(tmp_path, FANOUT, "fanout.yaml")


@pytest.fixture
def delayed() -> Iterator[Responder]:
    """Every answer (a stream's headers too) 60 s late."""
    with Responder(free_port(), "--delay-ms", "60000") as responder:
        yield responder


@pytest.fixture
def paced() -> Iterator[Responder]:
    """Streams of 6 events, 10 s apart."""
    with Responder(free_port(), "--stream-chunks", "6", "--chunk-interval-ms", "10000") as r:
        yield r


def _gone(backend: Responder, cut: str, count: int, seconds: float = 5) -> None:
    gone = "the backend works on for a gone client"
    wait_for(lambda: backend.stats()["active"] == 0, seconds, gone)
    assert backend.stats()[cut] == count


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_before_its_answer_cancels_every_sub_request(
    delayed: Responder, fanout_policy: Path, stream: bool
) -> None:
    with ProxyThread(proxy_settings(delayed.url, policy=fanout_policy)) as proxy:
        with posted_then_left(proxy.url + "/v1/chat/completions", chat(PROMPT, stream=stream)):
            wait_for(lambda: delayed.stats()["active"] == 8, 15, "not all 8 sub-requests ran")
        _gone(delayed, "streams_cut" if stream else "answers_cut", 8)


@pytest.mark.timeout(60)
def test_a_client_that_leaves_mid_stream_cancels_every_sub_request(
    paced: Responder, fanout_policy: Path
) -> None:
    with ProxyThread(proxy_settings(paced.url, policy=fanout_policy)) as proxy:
        url = proxy.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=chat(PROMPT, stream=True), timeout=30) as streamed:
            lines = streamed.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(lines).startswith("data: {")
            wait_for(lambda: paced.stats()["active"] == 8, 15, "not all 8 sub-requests ran")
        _gone(paced, "streams_cut", 8)


@pytest.mark.timeout(60)
def test_a_client_that_leaves_mid_stream_cancels_the_backend_stream(
    paced: Responder, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, NO_STAGES)
    with ProxyThread(proxy_settings(paced.url, policy=policy)) as proxy:
        url = proxy.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=chat(PROMPT, stream=True), timeout=30) as streamed:
            lines = streamed.iter_lines()
            assert next(lines).startswith("data: {")
        _gone(paced, "streams_cut", 1)


@pytest.mark.timeout(60)
def test_a_client_that_leaves_a_plain_request_cancels_the_backend_call(
    delayed: Responder, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, NO_STAGES)
    with ProxyThread(proxy_settings(delayed.url, policy=policy)) as proxy:
        try:
            with posted_then_left(proxy.url + "/v1/chat/completions", chat(PROMPT)):
                wait_for(lambda: delayed.stats()["active"] == 1, 15, "the request never arrived")
            _gone(delayed, "answers_cut", 1, seconds=3)
        finally:
            delayed.kill()  # else the proxy's shutdown waits for the answer
