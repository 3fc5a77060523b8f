"""The backend client: health, balancing, affinity, retries and error mapping."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import httpx
import pytest

from leangate.backend.balancer import Replica, choose
from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.errors import (
    BackendStatusError,
    BackendTimeout,
    BackendUnavailable,
    ModelNotFound,
)
from leangate.backend.sse import iter_events
from leangate.backend.transport import HttpxTransport
from leangate.bench.load import fd_census
from leangate.bench.responder import ResponderConfig, start_responder

MODELS = {"object": "list", "data": [{"id": "m", "object": "model"}]}


def _client(handler: httpx.MockTransport, *urls: str) -> BackendClient:
    settings = BackendSettings(urls=list(urls), max_retries=2)
    return BackendClient(settings, HttpxTransport(handler))


def _serving(
    down: set[str], calls: list[str], error: type[Exception] = httpx.ConnectError
) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        calls.append(host)
        if host in down:
            raise error("down")
        return httpx.Response(200, json={"ok": host})

    return httpx.MockTransport(handler)


async def test_connect_failure_retries_on_another_replica() -> None:
    calls: list[str] = []
    client = _client(_serving({"a"}, calls), "http://a", "http://b")
    await client.check_health()
    for _ in range(3):
        response = await client.send("/v1/completions", b"{}", model="m", stream=False)
        assert (await response.read()) == b'{"ok":"b"}'
    assert calls.count("a") == 1, "a refused once and was then taken out of rotation"
    assert all(r.outstanding == 0 for r in client.replicas)
    await client.aclose()


async def test_other_failures_are_not_retried() -> None:
    calls: list[str] = []
    client = _client(_serving({"a", "b"}, calls, httpx.ReadTimeout), "http://a", "http://b")
    await client.check_health()
    with pytest.raises(BackendTimeout):
        await client.send("/v1/completions", b"{}", model="m", stream=False)
    assert len(calls) == 1
    await client.aclose()


async def test_all_replicas_down_is_unavailable() -> None:
    calls: list[str] = []
    client = _client(_serving({"a", "b"}, calls), "http://a", "http://b")
    await client.check_health()
    with pytest.raises(BackendUnavailable):
        await client.send("/v1/completions", b"{}", model="m", stream=False)
    assert sorted(calls) == ["a", "b"]
    await client.aclose()


async def test_unknown_model_and_error_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        return httpx.Response(400, json={"error": {"message": "too long"}})

    client = _client(httpx.MockTransport(handler), "http://a")
    await client.check_health()
    with pytest.raises(ModelNotFound):
        await client.send("/v1/completions", b"{}", model="other", stream=False)
    with pytest.raises(BackendStatusError) as status:
        await client.send("/v1/completions", b"{}", model="m", stream=False)
    assert status.value.status_code == 400 and b"too long" in status.value.body
    assert client.replicas[0].outstanding == 0
    await client.aclose()


async def test_unhealthy_replica_is_marked_and_recovers() -> None:
    state = {"up": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if not state["up"]:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json=MODELS)

    client = _client(httpx.MockTransport(handler), "http://a")
    await client.check_health()
    assert not client.ready
    state["up"] = True
    await client.check_health()
    assert client.ready and client.serves("m")
    await client.aclose()


async def test_one_slow_health_answer_does_not_take_a_busy_replica_out() -> None:
    """A server busy decoding can miss one check's deadline; only a second miss in a row
    (``health_failures``) takes it out, and an answer clears the count."""
    state = {"slow": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if state["slow"]:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200, json=MODELS)

    client = _client(httpx.MockTransport(handler), "http://a")
    await client.check_health()
    state["slow"] = True
    await client.check_health()
    assert client.ready, "one slow answer"
    state["slow"] = False
    await client.check_health()
    state["slow"] = True
    await client.check_health()
    assert client.ready, "the answer in between cleared the count"
    await client.check_health()
    assert not client.ready, "two slow answers in a row"
    await client.aclose()


def test_affinity_keeps_a_prefix_on_one_replica_until_it_is_loaded() -> None:
    replicas = [Replica(f"http://r{i}", healthy=True, models=frozenset({"m"})) for i in range(4)]

    def key(text: str) -> Callable[[], bytes]:
        return lambda: text.encode()

    first = choose(replicas, key("You are a helpful assistant."))
    assert all(choose(replicas, key("You are a helpful assistant.")) is first for _ in range(5))
    spread = {choose(replicas, key(f"prompt {i}")).url for i in range(40)}
    assert len(spread) > 1
    first.outstanding = 10
    assert choose(replicas, key("You are a helpful assistant.")) is not first
    assert choose(replicas, None).outstanding == 0


async def _chunks(*parts: bytes):  # type: ignore[no-untyped-def]
    for part in parts:
        yield part


async def test_sse_parser_splits_events_across_chunks() -> None:
    stream = _chunks(
        b'data: {"a":', b'1}\n\ndata: {"b":2}\r\n\r\n: keep-alive\n\n', b"data: [DONE]\n\n"
    )
    assert [e async for e in iter_events(stream)] == [b'{"a":1}', b'{"b":2}']


async def test_sse_parser_rejects_a_stream_without_done() -> None:
    from leangate.backend.errors import BackendProtocolError

    with pytest.raises(BackendProtocolError):
        _ = [e async for e in iter_events(_chunks(b'data: {"a":1}\n\n'))]


def _sockets_to(port: int) -> int:
    """This process's open TCP sockets whose peer is ``port`` (from /proc)."""
    census = fd_census(os.getpid(), own_port=port, backend_ports={port}, redis_port=-1)
    return census["sockets_backends"]


async def test_idle_request_connections_close_while_probes_go_on() -> None:
    """Health checks and load polls every 20 ms, a keep-alive of 0.3 s: the 8 connections
    of a burst close once idle. When probes shared the requests' pool, aiohttp handed
    them the idle connection that waited longest, so each was touched every 0.1 s and
    none ever closed (``leangate bench load --soak``: 20 of them after the load)."""
    server = await start_responder(ResponderConfig(model="m", answer_delay_ms=100.0))
    port = server.sockets[0].getsockname()[1]
    settings = BackendSettings(
        urls=[f"http://127.0.0.1:{port}"],
        health_interval_s=0.02,
        load_poll_s=0.02,
        keepalive_s=0.3,
    )
    client = BackendClient(settings)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'

    async def ask() -> bytes:
        response = await client.send("/v1/chat/completions", body, model="m", stream=False)
        return await response.read()

    try:
        await client.start()
        answers = await asyncio.gather(*(ask() for _ in range(8)))
        assert all(b"Hello" in a for a in answers)
        assert _sockets_to(port) >= 8
        started = time.monotonic()
        while _sockets_to(port) > 2:
            assert time.monotonic() - started < 3.0, f"{_sockets_to(port)} connections stay open"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert _sockets_to(port) <= 2, "the probes keep at most one connection each"
        assert client.ready, "and the replica stays healthy"
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("urls", "transport", "expected"),
    [
        (["http://a:8000", "http://b:8000"], "lean", "LeanTransport"),
        (["http://a:8000", "https://b:8443"], "lean", "AiohttpTransport"),
        (["http://a:8000"], "aiohttp", "AiohttpTransport"),
    ],
)
def test_requests_go_through_the_transport_asked_for_unless_a_replica_needs_tls(
    urls: list[str], transport: str, expected: str
) -> None:
    client = BackendClient(BackendSettings.model_validate({"urls": urls, "transport": transport}))
    assert type(client._transport).__name__ == expected
