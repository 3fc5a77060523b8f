"""Load test: streamed responses dropped unread, through a real proxy in front of the real
vLLM server. Nothing may be left behind: no single-flight flight (later misses on the
same key would wait for it), no backend connection, no outstanding count on the replica.

A response is dropped unread when its client is gone by the time the backend's headers
arrive: the edge then never iterates the stream. A relay that holds the backend's first
bytes back for a moment makes that window wide enough to hit every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from conftest import MODEL, ProxyThread, proxy_settings, write_policy
from starlette.requests import ClientDisconnect

from leangate.middleware.app import LeanGateApp, create_app
from leangate.middleware.gateway import Gateway

pytestmark = pytest.mark.integration

POLICY = """
rules:
  - name: cached
    stages: [{use: cache, settings: {namespace: "%s"}}]
"""
DROPS_PER_KEY = 4
KEYS = 6
HEADERS_DELAY_S = 0.6
HANG_UP_AFTER_S = 0.15


class SlowRelay:
    """A TCP relay to the backend, in a thread, that delays the backend's first bytes of
    every connection (its answer's headers) by ``HEADERS_DELAY_S``."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowRelay:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        self.loop.run_forever()
        server.close()

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        backend_in, backend_out = await asyncio.open_connection(*self.target)
        pumps = [
            asyncio.ensure_future(_pump(client_in, backend_out, 0.0)),
            asyncio.ensure_future(_pump(backend_in, client_out, HEADERS_DELAY_S)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for writer in (client_out, backend_out):
            writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            if delay:
                await asyncio.sleep(delay)
                delay = 0.0
            writer.write(data)
            await writer.drain()


@pytest.fixture(scope="module")
def relay(vllm_url: str) -> Iterator[SlowRelay]:
    with SlowRelay(vllm_url) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(relay: SlowRelay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    policy = write_policy(tmp_path_factory.mktemp("unread"), POLICY % uuid.uuid4().hex[:8])
    backend = f"http://127.0.0.1:{relay.port}"
    with ProxyThread(proxy_settings(backend, policy=policy)) as running:
        yield running


def _gateway(proxy: ProxyThread) -> Gateway:
    gateway: Gateway = proxy.app.api.state.gateway
    return gateway


def _body(question: str) -> bytes:
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 64,
            "temperature": 0,
            "stream": True,
        }
    )


def _send_and_hang_up(url: str, body: bytes) -> None:
    """A streamed request whose client disconnects before reading a byte of the answer."""
    parts = urlsplit(url)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {parts.netloc}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname or "", parts.port or 80)) as client:
        client.sendall(head + body)
        time.sleep(HANG_UP_AFTER_S)  # the proxy has read the request and forwarded it


def _connections_to(port: int) -> int:
    """Established TCP connections this process holds to ``port`` (its own sockets only:
    other processes talk to the shared vLLM too)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def _settled(proxy: ProxyThread, backend_port: int, timeout_s: float = 30.0) -> tuple[int, ...]:
    """(flights, outstanding, backend connections), once they stop changing or at the
    deadline. Idle keep-alive connections of the health and load checks stay pooled."""
    gateway = _gateway(proxy)
    deadline = time.monotonic() + timeout_s
    while True:
        state = (
            len(gateway.services.cache.singleflight),
            sum(r.outstanding for r in gateway.backend.replicas),
            _connections_to(backend_port),
        )
        if (state[0] == 0 and state[1] == 0 and state[2] <= 3) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_streams_dropped_unread_leave_nothing_behind(proxy: ProxyThread, relay: SlowRelay) -> None:
    backend_port = relay.port
    tag = uuid.uuid4().hex[:8]
    questions = [f"Describe a river in detail ({tag}-{n})." for n in range(KEYS)]
    drops = [q for q in questions for _ in range(DROPS_PER_KEY)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda q: _send_and_hang_up(proxy.url, _body(q)), drops))
    flights, outstanding, connections = _settled(proxy, backend_port)
    assert flights == 0, "no single-flight flight was left behind"
    assert outstanding == 0, "no request is still counted against the replica"
    assert connections <= 3, f"{connections} backend connections are still open"
    started = time.monotonic()
    answer = httpx.post(
        proxy.url + "/v1/chat/completions",
        content=_body(questions[0]),
        headers={"content-type": "application/json"},
        timeout=120,
    )
    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    assert answer.headers["x-leangate-cache"] in {"miss", "hit-exact"}, "no dropped flight"
    assert time.monotonic() - started < 60, "a later miss does not wait on a dropped flight"
    flights, outstanding, _ = _settled(proxy, backend_port)
    assert flights == outstanding == 0


# --- a server whose send fails once the client is gone ----------------------------------------


def _http_scope(body: bytes) -> dict[str, object]:
    """An ASGI 2.4 server's request: ``send`` raises ``OSError`` once the client is gone,
    so the response never starts and its stream is never iterated."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


async def _drop(app: LeanGateApp, body: bytes) -> None:
    messages: list[dict[str, object]] = [{"type": "http.request", "body": body}]

    async def receive() -> dict[str, object]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        raise OSError("the client is gone")

    with contextlib.suppress(OSError, ClientDisconnect):
        await app(_http_scope(body), receive, send)  # type: ignore[arg-type]


async def _answer(app: LeanGateApp, body: bytes) -> tuple[dict[bytes, bytes], bytes]:
    messages: list[dict[str, object]] = [{"type": "http.request", "body": body}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client stays until the answer is complete
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_http_scope(body), receive, send)  # type: ignore[arg-type]
    return dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


async def test_streams_a_server_never_started_leave_nothing_behind(
    relay: SlowRelay, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, POLICY % uuid.uuid4().hex[:8])
    app = create_app(proxy_settings(f"http://127.0.0.1:{relay.port}", policy=policy))
    async with app.api.router.lifespan_context(app.api):
        gateway: Gateway = app.api.state.gateway
        tag = uuid.uuid4().hex[:8]
        questions = [f"Describe a mountain in detail ({tag}-{n})." for n in range(KEYS)]
        drops = [_body(q) for q in questions for _ in range(DROPS_PER_KEY)]
        await asyncio.wait_for(asyncio.gather(*(_drop(app, body) for body in drops)), 120)
        for _ in range(50):
            if not len(gateway.services.cache.singleflight) and _connections_to(relay.port) <= 3:
                break
            await asyncio.sleep(0.1)
        assert len(gateway.services.cache.singleflight) == 0, "no flight was left behind"
        assert sum(r.outstanding for r in gateway.backend.replicas) == 0
        assert _connections_to(relay.port) <= 3, "the unread streams' connections were closed"
        headers, body = await asyncio.wait_for(_answer(app, drops[0]), 60)
        assert headers[b"x-leangate-cache"] in {b"miss", b"hit-exact"}, "not a dropped flight"
        assert body.endswith(b"data: [DONE]\n\n")
        assert sum(r.outstanding for r in gateway.backend.replicas) == 0
