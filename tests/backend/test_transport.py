"""Both production transports against the benchmark responder, which ends a chunked body
the way vLLM does: ``data: [DONE]`` first, the end of the body in a later write."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from leangate.backend import lean as lean_module
from leangate.backend import transport as transport_module
from leangate.backend.lean import LeanTransport
from leangate.backend.sse import iter_events
from leangate.backend.transport import AiohttpTransport, Transport, UpstreamRequest
from leangate.bench.responder import ResponderConfig, start_responder

CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'


async def _responder(config: ResponderConfig) -> AsyncIterator[str]:
    server = await start_responder(config)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def paced() -> AsyncIterator[str]:
    """Each chunk, and the end of the body, 5 ms after the one before."""
    async for url in _responder(ResponderConfig(stream_chunks=4, chunk_interval_ms=5.0)):
        yield url


@pytest.fixture
async def slow() -> AsyncIterator[str]:
    """The end of the body comes 2 s after ``[DONE]``."""
    async for url in _responder(ResponderConfig(stream_chunks=4, end_delay_ms=2000.0)):
        yield url


@pytest.fixture(params=[LeanTransport, AiohttpTransport])
def make(request: pytest.FixtureRequest) -> type[Transport]:
    kind: type[Transport] = request.param
    return kind


def _stream(url: str) -> UpstreamRequest:
    return UpstreamRequest("POST", url + "/v1/chat/completions", CHAT, stream=True)


async def _stats(transport: Transport, url: str) -> dict[str, int]:
    response = await transport.send(UpstreamRequest("GET", url + "/stats"))
    stats: dict[str, int] = json.loads(await response.read())
    return stats


async def test_consecutive_streams_reuse_one_connection(paced: str, make: type[Transport]) -> None:
    async with make() as transport:
        for _ in range(5):
            response = await transport.send(_stream(paced))
            payloads = [p async for p in iter_events(response.iter_chunks())]
            await response.aclose()
            assert len(payloads) == 4
        stats = await _stats(transport, paced)
    assert stats["streams"] == 5
    assert stats["connections_opened"] == 1
    assert stats["streams_cut"] == 0


async def test_a_stream_abandoned_early_drops_its_connection(
    paced: str, make: type[Transport]
) -> None:
    async with make() as transport:
        response = await transport.send(_stream(paced))
        chunks = response.iter_chunks()
        await anext(chunks)
        await response.aclose()
        await asyncio.sleep(0.05)  # the responder notices at its next chunk
        stats = await _stats(transport, paced)
    assert stats["streams_cut"] == 1
    assert stats["connections_opened"] == 2


async def test_a_body_that_does_not_end_after_done_is_dropped_after_the_grace(
    slow: str, make: type[Transport], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport_module, "END_GRACE_S", 0.05)
    monkeypatch.setattr(lean_module, "END_GRACE_S", 0.05)
    async with make() as transport:
        response = await transport.send(_stream(slow))
        assert len([p async for p in iter_events(response.iter_chunks())]) == 4
        started = asyncio.get_running_loop().time()
        await response.aclose()
        assert asyncio.get_running_loop().time() - started < 1.0
        stats = await _stats(transport, slow)
    assert stats["connections_opened"] == 2
