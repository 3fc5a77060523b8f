"""The lean transport against small servers that misbehave on purpose: each failure becomes
the right ``BackendError``, and no connection, slot or paused socket is left behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from leangate.backend.errors import BackendConnectError, BackendProtocolError, BackendTimeout
from leangate.backend.lean import HIGH_WATER, LeanTransport
from leangate.backend.transport import UpstreamRequest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Server:
    """A TCP server whose connections ``handler`` answers; counts what it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        """One request's head and body (``content-length`` framed)."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        self.requests += 1
        return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def serving(make: Callable[[Server], Handler]) -> AsyncIterator[tuple[Server, str]]:
    server = Server(lambda r, w: asyncio.sleep(0))
    server.handler = make(server)
    tcp = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    try:
        yield server, f"http://127.0.0.1:{tcp.sockets[0].getsockname()[1]}"
    finally:
        tcp.close()


def _post(url: str, timeout_s: float = 5.0, stream: bool = False) -> UpstreamRequest:
    return UpstreamRequest("POST", url + "/v1/x", b'{"a": 1}', timeout_s=timeout_s, stream=stream)


def keep_alive(server: Server, answer: bytes = OK) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            writer.write(answer)
            await writer.drain()

    return handle


async def test_answers_are_read_and_the_connection_is_kept() -> None:
    async with serving(keep_alive) as (server, url), LeanTransport() as transport:
        for _ in range(3):
            response = await transport.send(_post(url))
            assert (response.status, await response.read()) == (200, b"{}")
            assert response.headers["content-type"] == "application/json"
    assert (server.connections, server.requests) == (1, 3)


async def test_the_request_goes_out_whole_with_its_host_and_headers() -> None:
    seen: list[bytes] = []

    def record(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await server.request(reader))
            writer.write(OK)
            await writer.drain()

        return handle

    async with serving(record) as (_, url), LeanTransport() as transport:
        request = UpstreamRequest("POST", url + "/v1/x?y=1", b"body", {"authorization": "B k"})
        await (await transport.send(request)).read()
    head, body = seen[0].split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/x?y=1 HTTP/1.1"
    assert f"host: {url.removeprefix('http://')}".encode() in lines
    assert b"authorization: B k" in lines and b"content-length: 4" in lines
    assert body == b"body"


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with serving(keep_alive) as (_, url):
        pass  # closed: nobody listens there now
    async with LeanTransport() as transport:
        with pytest.raises(BackendConnectError):
            await transport.send(_post(url))


@pytest.mark.parametrize(
    "answer",
    [
        b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"cut": ',  # closed mid-body
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nabcde\r\n",
    ],
)
async def test_a_body_cut_short_is_a_protocol_error(answer: bytes) -> None:
    def cut(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            writer.write(answer)
            await writer.drain()

        return handle

    async with serving(cut) as (_, url), LeanTransport() as transport:
        response = await transport.send(_post(url))
        with pytest.raises(BackendProtocolError):
            await response.read()


async def test_a_malformed_answer_is_a_protocol_error() -> None:
    garbage = b"NOT HTTP AT ALL\r\n\r\n"
    async with serving(lambda s: keep_alive(s, garbage)) as (_, url), LeanTransport() as t:
        with pytest.raises(BackendProtocolError):
            await t.send(_post(url))


async def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped() -> None:
    def silent(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            await reader.read()  # until the client closes

        return handle

    async with serving(silent) as (server, url), LeanTransport() as transport:
        with pytest.raises(BackendTimeout):
            await transport.send(_post(url, timeout_s=0.1))
        await asyncio.sleep(0.05)
        assert server.open == 0


async def test_a_stream_silent_too_long_is_a_timeout() -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"

    def stalls(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            writer.write(head + b"6\r\ndata: \r\n")
            await writer.drain()
            await reader.read()

        return handle

    async with serving(stalls) as (_, url), LeanTransport() as transport:
        response = await transport.send(_post(url, timeout_s=0.2, stream=True))
        chunks = response.iter_chunks()
        assert await anext(chunks) == b"data: "
        with pytest.raises(BackendTimeout):
            await anext(chunks)
        await response.aclose()


async def test_a_kept_connection_the_server_closed_is_replaced_and_the_request_sent_again() -> None:
    """The server answers one request per connection but says nothing of closing: the
    second request meets a closed connection before any answer, and goes again."""

    def one_each(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            writer.write(OK)
            await writer.drain()
            with contextlib.suppress(asyncio.IncompleteReadError):
                await server.request(reader)  # read, never answered

        return handle

    async with serving(one_each) as (server, url), LeanTransport() as transport:
        for _ in range(2):
            assert await (await transport.send(_post(url))).read() == b"{}"
    assert server.connections == 2
    assert server.requests == 3


async def test_a_new_connection_closed_before_an_answer_is_not_retried() -> None:
    def hangs_up(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)

        return handle

    async with serving(hangs_up) as (server, url), LeanTransport() as transport:
        with pytest.raises(BackendProtocolError):
            await transport.send(_post(url))
    assert server.requests == 1


async def test_connection_close_is_honoured() -> None:
    closing = OK.replace(b"content-length", b"connection: close\r\ncontent-length")

    def once(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            writer.write(closing)
            await writer.drain()

        return handle

    async with serving(once) as (server, url), LeanTransport() as transport:
        for _ in range(3):
            assert await (await transport.send(_post(url))).read() == b"{}"
    assert server.connections == 3


async def test_an_idle_connection_past_its_keepalive_is_not_used() -> None:
    async with serving(keep_alive) as (server, url), LeanTransport(keepalive_s=0.05) as t:
        await (await t.send(_post(url))).read()
        await asyncio.sleep(0.1)
        await (await t.send(_post(url))).read()
        await asyncio.sleep(0.02)
        assert server.open == 1, "the expired connection was not closed"
    assert server.connections == 2


async def test_the_pool_holds_at_most_its_size_in_use() -> None:
    def slow(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await server.request(reader)
                await asyncio.sleep(0.03)
                writer.write(OK)
                await writer.drain()

        return handle

    async with serving(slow) as (server, url), LeanTransport(pool_size=2) as transport:

        async def one() -> bytes:
            return await (await transport.send(_post(url))).read()

        answers = await asyncio.gather(*(one() for _ in range(6)))
    assert answers == [b"{}"] * 6
    assert server.most_open == 2 and server.requests == 6


async def test_a_body_read_slowly_pauses_the_socket_and_the_connection_is_kept() -> None:
    big = b"x" * (4 * HIGH_WATER)
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big) + big
    async with (
        serving(lambda s: keep_alive(s, answer)) as (server, url),
        LeanTransport() as transport,
    ):
        response = await transport.send(_post(url, stream=True))
        received = b""
        async for chunk in response.iter_chunks():
            received += chunk
            await asyncio.sleep(0.001)
        await response.aclose()
        assert received == big
        assert await (await transport.send(_post(url))).read() == big
    assert server.connections == 1


async def test_a_response_left_unread_and_closed_drops_its_connection() -> None:
    big = b"HTTP/1.1 200 OK\r\ncontent-length: 10000000\r\n\r\n" + b"x" * 1000

    def endless(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            writer.write(big)
            await writer.drain()
            await reader.read()

        return handle

    async with serving(endless) as (server, url), LeanTransport(pool_size=1) as transport:
        response = await transport.send(_post(url, stream=True))
        await response.aclose()
        await asyncio.sleep(0.05)
        assert server.open == 0
        # the slot is free again: a second request does not wait for the first
        second = await asyncio.wait_for(transport.send(_post(url, stream=True)), 1)
        await second.aclose()


async def test_a_whole_body_left_unread_leaves_a_connection_that_still_reads() -> None:
    """The body's last bytes took the buffer past the high water (the socket paused) and
    ended it: its connection goes back to the pool reading again."""
    big = b"x" * (HIGH_WATER + 1000)
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big) + big
    async with (
        serving(lambda s: keep_alive(s, answer)) as (server, url),
        LeanTransport() as transport,
    ):
        response = await transport.send(_post(url))
        await asyncio.sleep(0.1)  # the whole body arrives, unread
        await response.aclose()
        again = await asyncio.wait_for(transport.send(_post(url)), 2)
        assert await again.read() == big
    assert server.connections == 1


async def test_a_request_waits_for_a_free_connection_no_longer_than_its_timeout() -> None:
    def slow(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            await asyncio.sleep(1)
            writer.write(OK)
            await writer.drain()

        return handle

    async with serving(slow) as (_, url), LeanTransport(pool_size=1) as transport:
        first = asyncio.create_task(transport.send(_post(url)))
        await asyncio.sleep(0.05)
        with pytest.raises(BackendTimeout):
            await transport.send(_post(url, timeout_s=0.1))
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first


class _Refusing:
    """A transport that looks open but fails to write, as one closed under the pool does."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        raise RuntimeError("unable to perform operation: the handler is closed")

    def close(self) -> None:
        self.inner.close()


async def test_a_kept_connection_that_fails_to_write_is_replaced() -> None:
    async with serving(keep_alive) as (server, url), LeanTransport() as transport:
        assert await (await transport.send(_post(url))).read() == b"{}"
        (pool,) = transport._pools.values()
        kept = pool.idle[-1]
        kept.transport = _Refusing(kept.transport)  # type: ignore[arg-type, assignment]
        assert await (await transport.send(_post(url))).read() == b"{}"
    assert server.connections == 2
