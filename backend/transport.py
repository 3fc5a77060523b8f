"""How bytes reach an OpenAI-compatible server: a one-method async interface.

A ``Transport`` sends one ``UpstreamRequest`` and returns an ``UpstreamResponse`` as soon as
the status line and headers have arrived; the body is then read whole or chunk by chunk.
Transports translate their library's exceptions into the tree of ``leangate.backend.errors``.

The production transport is ``LeanTransport`` (``backend/lean.py``): half of aiohttp's CPU
per request. ``AiohttpTransport`` remains the alternative (and carries the health probes):
on this project's 2-core machines it relayed with less than half of httpx's added latency
and kept its pool healthy at concurrency 64 (see docs/performance.md). ``HttpxTransport``
wraps any httpx transport, which lets unit tests of failure paths drive the client through
``httpx.MockTransport``.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import aiohttp
import httpx

from leangate.backend.errors import (
    BackendConnectError,
    BackendError,
    BackendProtocolError,
    BackendTimeout,
)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One HTTP request to a backend replica."""

    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 600.0
    """For a plain answer, the whole exchange; for a stream, the longest silence."""
    stream: bool = False


class UpstreamResponse(ABC):
    """A response whose headers have arrived and whose body is still to be read."""

    status: int
    headers: Mapping[str, str]

    @abstractmethod
    async def read(self) -> bytes:
        """Read the whole body and release the connection."""

    @abstractmethod
    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Yield the body as it arrives; raises a ``BackendError`` if it is cut short."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the connection; an unread body aborts the request on the server."""


class Transport(ABC):
    """Sends requests; owns a connection pool for its whole lifetime."""

    @abstractmethod
    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send ``request``; return once the headers have arrived."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Close pooled connections."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# --- aiohttp ---------------------------------------------------------------------------------


def _aiohttp_error(exc: BaseException) -> BackendError:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return BackendConnectError(str(exc))
    if isinstance(exc, asyncio.TimeoutError):
        return BackendTimeout("backend did not answer in time")
    return BackendProtocolError(f"{type(exc).__name__}: {exc}")


_END_OF_STREAM = b"[DONE]"
END_GRACE_S = 0.5
"""How long ``aclose`` waits for the end of a body whose last event was ``[DONE]``."""


def stream_finished(last_chunk: bytes) -> bool:
    """Whether a stream's last bytes read were its ``[DONE]`` event (and the reader is not
    being cancelled): its connection is then worth the wait for the end of the body."""
    task = asyncio.current_task()
    cancelled = task is not None and task.cancelling() > 0
    return not cancelled and last_chunk[-16:].rstrip().endswith(_END_OF_STREAM)


class _AiohttpResponse(UpstreamResponse):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers
        self._last_chunk = b""

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _aiohttp_error(exc) from exc
        finally:
            self._response.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                self._last_chunk = chunk
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _aiohttp_error(exc) from exc

    async def aclose(self) -> None:
        """Return the connection to the pool if the body was read to its end, else drop it,
        so that the server sees the disconnect and aborts the request.

        A reader of a stream stops at ``[DONE]``, but vLLM writes the end of the chunked
        body separately, so it has often not arrived yet: closing then would cost every
        stream a new connection. When the last bytes read were ``[DONE]`` (and the task is
        not being cancelled), the end of the body is awaited for up to ``END_GRACE_S``.
        """
        content = self._response.content
        try:
            if not content.at_eof() and stream_finished(self._last_chunk):
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    async with asyncio.timeout(END_GRACE_S):
                        await content.readany()  # b"" at the end of the body, else data
        finally:
            if content.at_eof():
                self._response.release()
            else:
                self._response.close()


KEEPALIVE_S = 4.0
"""How long an idle pooled connection is kept: under vLLM's own 5 s (uvicorn's
``timeout_keep_alive``, ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), so that the proxy closes first.
A connection the server closes just as the proxy sends on it fails the request with a 502
on aiohttp (bytes were sent); the lean transport sends it again once (``STALE_WITHIN_S``).
At any load worth a pool, connections are reused long before; after a burst, the idle ones
close within a few seconds."""


class AiohttpTransport(Transport):
    """A pooled keep-alive aiohttp session."""

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
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[bool, float], aiohttp.ClientTimeout] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._pool_size, keepalive_timeout=self._keepalive_s, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _timeout(self, request: UpstreamRequest) -> aiohttp.ClientTimeout:
        key = (request.stream, request.timeout_s)
        timeout = self._timeouts.get(key)
        if timeout is None:
            if request.stream:
                timeout = aiohttp.ClientTimeout(
                    sock_connect=self._connect_timeout_s, sock_read=request.timeout_s
                )
            else:
                timeout = aiohttp.ClientTimeout(
                    total=request.timeout_s, sock_connect=self._connect_timeout_s
                )
            self._timeouts[key] = timeout
        return timeout

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        timeout = self._timeout(request)
        try:
            response = await self._get_session().request(
                request.method,
                request.url,
                data=request.body,
                headers=request.headers,
                timeout=timeout,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _aiohttp_error(exc) from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- httpx -----------------------------------------------------------------------------------


def _httpx_error(exc: httpx.HTTPError) -> BackendError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return BackendConnectError(str(exc) or type(exc).__name__)
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout("backend did not answer in time")
    return BackendProtocolError(f"{type(exc).__name__}: {exc}")


class _HttpxResponse(UpstreamResponse):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from exc
        finally:
            await self._response.aclose()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport(Transport):
    """Sends through an ``httpx.AsyncClient``; pass ``transport=httpx.MockTransport(...)``
    to fake a server in tests."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(transport=transport, timeout=None)

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        built = self._client.build_request(
            request.method,
            request.url,
            content=request.body,
            headers=dict(request.headers),
            timeout=httpx.Timeout(request.timeout_s, connect=5.0),
        )
        try:
            response = await self._client.send(built, stream=True)
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        await self._client.aclose()
