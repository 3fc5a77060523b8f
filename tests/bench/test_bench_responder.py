"""The benchmark responder must look exactly like an OpenAI server to real clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from leangate.bench.responder import ResponderConfig, start_responder


async def _client(config: ResponderConfig) -> AsyncIterator[openai.AsyncOpenAI]:
    server = await start_responder(config)
    port = server.sockets[0].getsockname()[1]
    try:
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        ) as client:
            yield client
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    async for c in _client(ResponderConfig(model="resp-model", stream_chunks=3)):
        yield c


@pytest.fixture
async def paced_client() -> AsyncIterator[openai.AsyncOpenAI]:
    async for c in _client(ResponderConfig(stream_chunks=4, chunk_interval_ms=1.0)):
        yield c


async def test_models_lists_configured_model(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == ["resp-model"]


async def test_chat_completion(client: openai.AsyncOpenAI) -> None:
    for _ in range(3):  # several requests over one keep-alive connection
        reply = await client.chat.completions.create(
            model="asked-model", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.model == "asked-model"
        assert reply.object == "chat.completion"
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None
        assert reply.usage.total_tokens > 0


async def test_text_completion(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model="m", prompt="hi")
    assert reply.object == "text_completion"
    assert reply.choices[0].text


async def test_chat_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    content_chunks = [c for c in chunks if c.choices]
    assert len(content_chunks) == 3
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == ResponderConfig.completion_text
    assert chunks[-1].usage is not None


async def test_text_stream(paced_client: openai.AsyncOpenAI) -> None:
    for _ in range(2):  # the paced stream must leave the connection reusable
        stream = await paced_client.completions.create(model="m", prompt="hi", stream=True)
        pieces = [chunk.choices[0].text async for chunk in stream]
        assert len(pieces) == 4
        assert "".join(pieces) == ResponderConfig.completion_text


async def test_unknown_route_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="m", input="x")


async def test_invalid_json_is_400_and_health(client: openai.AsyncOpenAI) -> None:
    async with httpx.AsyncClient(trust_env=False, base_url=str(client.base_url)) as raw:
        bad = await raw.post("chat/completions", content=b"{not json")
        assert bad.status_code == 400
        assert "error" in bad.json()
        health = await raw.get(str(client.base_url).replace("/v1/", "/health"))
        assert health.status_code == 200


async def test_the_end_of_a_stream_body_is_a_write_of_its_own() -> None:
    """Like vLLM: ``data: [DONE]`` arrives before the chunked body's terminator."""
    server = await start_responder(ResponderConfig(end_delay_ms=100.0))
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = b'{"model":"m","messages":[],"stream":true}'
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        received = await reader.readuntil(b"data: [DONE]\n\n\r\n")
        assert b"\r\n0\r\n\r\n" not in received
        assert await asyncio.wait_for(reader.readexactly(5), 1.0) == b"0\r\n\r\n"
        writer.write(b"GET /stats HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        stats = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
    assert stats == {
        "connections_opened": 1,
        "requests": 2,
        "streams": 1,
        "streams_cut": 0,
        "answers_cut": 0,
        "active": 0,
    }


async def test_a_request_paces_its_own_answer_and_a_client_that_leaves_is_counted() -> None:
    """The ``responder`` body field (fault tests): a delayed plain answer, a stream of
    ``chunks`` words, an answer of the request's ``text``; cut answers are counted."""
    server = await start_responder(ResponderConfig())
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            started = asyncio.get_running_loop().time()
            slow = {"delay_ms": 300, "text": "one two three"}
            reply = await http.post("/v1/chat/completions", json={**chat, "responder": slow})
            assert asyncio.get_running_loop().time() - started >= 0.3
            assert reply.json()["choices"][0]["message"]["content"] == "one two three"
            paced = {"chunks": 5, "chunk_interval_ms": 10, "text": "a b"}
            streamed = await http.post(
                "/v1/chat/completions", json={**chat, "stream": True, "responder": paced}
            )
            events = [e for e in streamed.text.split("\n\n") if e]
            assert events[-1] == "data: [DONE]" and len(events) == 6
            texts = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]]
            assert "".join(texts) == "a b a b a"
            bad = await http.post("/v1/chat/completions", json={**chat, "responder": {"x": 1}})
            assert bad.status_code == 400

            async def leave(body: dict[str, object]) -> None:
                with contextlib.suppress(httpx.TimeoutException):
                    await http.post("/v1/chat/completions", json=body, timeout=0.2)

            await leave({**chat, "responder": {"delay_ms": 5000}})
            await leave({**chat, "stream": True, "responder": {"delay_ms": 5000}})
            for _ in range(50):
                stats = (await http.get("/stats")).json()
                if stats["active"] == 0:
                    break
                await asyncio.sleep(0.02)
    finally:
        server.close()
        await server.wait_closed()
    assert stats["answers_cut"] == 1 and stats["streams_cut"] == 1 and stats["active"] == 0
