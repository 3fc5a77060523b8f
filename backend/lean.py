"""A lean HTTP/1.1 transport: asyncio protocols, ``httptools``'s parser, a keep-alive pool.

The proxy sends one kind of request, a small JSON ``POST`` to a few known replicas, and
aiohttp's general-purpose client spent about half of the proxy's CPU on it (header
multidicts, payload registries, timer handles, a writer task per request: see
docs/performance.md). This transport does only what that request needs:

- one pool of keep-alive connections per host and port, at most ``pool_size`` in use,
  the idle ones used last-in first-out and closed once idle for ``keepalive_s`` (under
  vLLM's own 5 s, so the proxy closes first);
- the request written in one ``write`` (status line, headers, ``content-length``, body);
- the response parsed by ``httptools`` (llhttp, the parser uvicorn uses on the server
  side): ``content-length`` and chunked bodies, keep-alive as the server says;
- a plain answer's whole exchange within ``timeout_s``; a stream's silences each within it;
- a stream read more slowly than it arrives pauses the socket (``pause_reading``) past
  ``HIGH_WATER`` bytes buffered;
- a response closed before its end drops its connection, so the server sees the client
  leave and aborts the generation; a stream whose last event was ``[DONE]`` gets
  ``END_GRACE_S`` for the end of its chunked body, so that it keeps its connection.

A request is sent again once, and only when it went out on a kept connection that then
closed within ``STALE_WITHIN_S`` without a byte of answer: the server had closed that
connection while it was idle and never read the request (``KEEPALIVE_S`` makes it rare).
A response that is only HTTP/1.0 framed (its body ends when the connection does) is not
understood; vLLM's server always frames its bodies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from leangate.backend.errors import (
    BackendConnectError,
    BackendProtocolError,
    BackendTimeout,
)
from leangate.backend.transport import (
    END_GRACE_S,
    KEEPALIVE_S,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    stream_finished,
)


class StaleConnection(BackendProtocolError):
    """A kept-alive connection the server had closed before the request reached it: the
    server never saw the request, so it is sent again, once, on a new connection."""


STALE_WITHIN_S = 0.5
"""A kept connection closed this soon after a request went out on it, with no answer, was
stale: the server closed it idle. Later, the server may have read the request."""
HIGH_WATER = 256 * 1024
"""Bytes of an unread body buffered before the socket stops reading."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.used = 0
        """Requests sent on this connection."""
        self.received = False
        """Whether any byte of the current response arrived."""
        self.busy = False
        """Checked out of the pool: holds one of its slots until it is back or closed."""
        self.idle_since = 0.0
        self.sent_at = 0.0
        self._response: LeanResponse | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BackendProtocolError(f"malformed response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._response is not None and not self._response.complete:
            stale = time.monotonic() - self.sent_at < STALE_WITHIN_S
            if self.used > 1 and not self.received and stale:
                self._fail(StaleConnection("the backend closed an idle connection"))
            else:
                self._fail(BackendProtocolError("the backend closed the connection mid-response"))
        self.pool.free(self)

    # --- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._response is not None:
            self._response.headers_done(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response.feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is None:
            return
        self._response = None
        keep = self.parser.should_keep_alive()
        response.finish()
        if keep and not self.closed:
            self.pool.put(self)
        else:
            self.close()

    # --- use ----------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, and not closing (the server may have ended it, unnoticed so far)."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def start(self, head: bytes, body: bytes | None, response: LeanResponse) -> None:
        assert self.transport is not None
        self._response = response
        self.used += 1
        self.received = False
        self.sent_at = time.monotonic()
        try:
            self.transport.write(head + body if body else head)
        except (RuntimeError, OSError) as exc:  # closed under us since it was checked
            self._response = None
            if self.used > 1:
                raise StaleConnection(f"the connection was closed: {exc}") from exc
            raise BackendConnectError(f"the connection was closed: {exc}") from exc

    def eof_received(self) -> None:
        """The server ended its side: no request goes on this connection again (the
        transport then closes it)."""
        self.closed = True

    def _fail(self, exc: Exception) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.fail(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.pool.free(self)


class _Pool:
    """Connections to one host and port: at most ``limit`` in use at once, the idle ones
    kept for reuse, the most recently used first (so that the others age out)."""

    def __init__(
        self, host: str, port: int, limit: int, keepalive_s: float, connect_timeout_s: float
    ) -> None:
        self.host, self.port = host, port
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.idle: collections.deque[_Connection] = collections.deque()
        """Oldest first: ``get`` takes from the right, ``_expire`` closes from the left."""
        self.slots = asyncio.Semaphore(limit)
        self._sweep: asyncio.TimerHandle | None = None

    async def get(self, wait_s: float) -> _Connection:
        """A connection for one request; waits at most ``wait_s`` for a free slot."""
        if self.slots.locked():
            try:
                async with asyncio.timeout(wait_s):
                    await self.slots.acquire()
            except TimeoutError:
                raise BackendTimeout("every connection to the backend stayed busy") from None
        else:
            await self.slots.acquire()
        try:
            connection = self._idle() or await self._connect()
        except BaseException:
            self.slots.release()
            raise
        connection.busy = True
        return connection

    def _idle(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()
            if connection.usable and now - connection.idle_since < self.keepalive_s:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                transport, protocol = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except (OSError, TimeoutError) as exc:
            raise BackendConnectError(str(exc) or type(exc).__name__) from exc
        protocol.transport = transport  # uvloop may call connection_made after returning
        return protocol

    def put(self, connection: _Connection) -> None:
        """A connection whose response is complete, for the next request."""
        self.free(connection)
        connection.idle_since = time.monotonic()
        self.idle.append(connection)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.keepalive_s, self._expire)

    def _expire(self) -> None:
        """Close the connections idle for ``keepalive_s``, before the server does; come
        back when the next one will be."""
        self._sweep = None
        now = time.monotonic()
        while self.idle and (
            self.idle[0].closed or now - self.idle[0].idle_since >= self.keepalive_s
        ):
            self.idle.popleft().close()
        if self.idle:
            wait = self.idle[0].idle_since + self.keepalive_s - now
            self._sweep = asyncio.get_running_loop().call_later(max(wait, 0.01), self._expire)

    def free(self, connection: _Connection) -> None:
        """Give back the slot of a connection that was in use (once)."""
        if connection.busy:
            connection.busy = False
            self.slots.release()

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self.idle:
            self.idle.pop().close()


class LeanResponse(UpstreamResponse):
    """A response whose headers have arrived; the body follows into a buffer."""

    def __init__(self, connection: _Connection, timeout_s: float, stream: bool) -> None:
        self._connection = connection
        self._timeout_s = timeout_s
        self._deadline = None if stream else time.monotonic() + timeout_s
        self.status = 0
        self.headers: dict[str, str] = {}
        self.complete = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None
        self._headers_ready = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._last_chunk = b""

    # --- fed by the connection ----------------------------------------------------------------

    def headers_done(self, status: int) -> None:
        self.status = status
        if not self._headers_ready.done():
            self._headers_ready.set_result(None)

    def feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused:
            self._reading(False)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        if self._paused:  # the connection goes back to the pool: it must read again
            self._reading(True)
        self._wake()

    def _reading(self, on: bool) -> None:
        """Resume or pause the socket's reading (flow control of an unread body)."""
        transport = self._connection.transport
        if transport is not None:
            if on:
                transport.resume_reading()
            else:
                transport.pause_reading()
            self._paused = not on

    def fail(self, exc: Exception) -> None:
        self._error = exc
        if not self._headers_ready.done():
            self._headers_ready.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- read by the caller -------------------------------------------------------------------

    async def wait_headers(self) -> None:
        async with asyncio.timeout(self._remaining()):
            await self._headers_ready

    def _remaining(self) -> float:
        if self._deadline is None:
            return self._timeout_s
        return max(self._deadline - time.monotonic(), 0.0)

    async def _next(self) -> bytes | None:
        """The next buffered piece of the body; None at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._remaining()):
                    await self._waiter
            except TimeoutError:
                raise BackendTimeout("backend did not answer in time") from None
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= HIGH_WATER // 4:
            self._reading(True)
        return chunk

    async def read(self) -> bytes:
        pieces = []
        try:
            while (chunk := await self._next()) is not None:
                pieces.append(chunk)
        finally:
            await self.aclose()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._next()) is not None:
            self._last_chunk = chunk
            yield chunk

    async def aclose(self) -> None:
        """Keep the connection if the body was read to its end (waiting ``END_GRACE_S``
        for the end of a stream whose last event was ``[DONE]``), else drop it: the server
        then sees the client leave."""
        if not self.complete and self._error is None and stream_finished(self._last_chunk):
            with contextlib.suppress(TimeoutError, Exception):
                async with asyncio.timeout(END_GRACE_S):
                    while await self._next() is not None:
                        pass
        if not self.complete:
            self._connection.close()


class LeanTransport(Transport):
    """Keep-alive pools of lean connections, one per host and port (see the module)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        pool_size: int = 512,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._pool_size = pool_size
        self._keepalive_s = keepalive_s
        self._pools: dict[tuple[str, int], _Pool] = {}

    def _pool(self, host: str, port: int) -> _Pool:
        pool = self._pools.get((host, port))
        if pool is None:
            pool = _Pool(host, port, self._pool_size, self._keepalive_s, self._connect_timeout_s)
            self._pools[host, port] = pool
        return pool

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        parts = urlsplit(request.url)
        if parts.scheme != "http" or parts.hostname is None:
            raise BackendConnectError(f"the lean transport speaks plain http only: {request.url}")
        pool = self._pool(parts.hostname, parts.port or 80)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        body = request.body or b""
        head = _head(request.method, target, parts.netloc, request.headers, len(body))
        try:
            return await self._exchange(pool, head, body, request)
        except StaleConnection:
            return await self._exchange(pool, head, body, request)

    async def _exchange(
        self, pool: _Pool, head: bytes, body: bytes, request: UpstreamRequest
    ) -> LeanResponse:
        connection = await pool.get(request.timeout_s)
        response = LeanResponse(connection, request.timeout_s, request.stream)
        try:
            connection.start(head, body, response)
            await response.wait_headers()
        except TimeoutError:
            connection.close()
            raise BackendTimeout("backend did not answer in time") from None
        except BaseException:
            connection.close()
            raise
        return response

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _head(method: str, target: str, host: str, headers: Mapping[str, str], length: int) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
