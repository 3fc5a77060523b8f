"""The HTTP edge: an ASGI app (FastAPI on uvicorn) around the ``Gateway``.

Only here do results become HTTP: JSON bodies pass through as the backend's bytes, and
streams get their SSE framing back. The completion routes bypass FastAPI's routing (see
``LeanGateApp``) because they are the hot path; the other routes are FastAPI's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import Headers, State
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from leangate.backend.errors import BackendError, BackendProtocolError
from leangate.backend.sse import DONE_EVENT, encode_event
from leangate.backend.transport import Transport, UpstreamResponse
from leangate.cache.purge import purge
from leangate.cache.stats import count_entries
from leangate.cache.store import StoreError
from leangate.middleware.admin_api import add_admin_routes, admin_refusal, error, is_admin
from leangate.middleware.body import read_body
from leangate.middleware.context import RequestContext, Result, StreamResult, aclose_quietly
from leangate.middleware.corpora_api import add_corpus_routes
from leangate.middleware.errors import (
    ClientGone,
    ProxyError,
    ShuttingDown,
    describe_validation_error,
    error_response,
    stream_error_payload,
)
from leangate.middleware.forwarding import forward_call
from leangate.middleware.gateway import Gateway
from leangate.middleware.metrics import Metrics
from leangate.middleware.openapi import describe_routes
from leangate.middleware.policy import load_policy
from leangate.middleware.protocol import Route
from leangate.middleware.runtime import open_runtime
from leangate.middleware.scope import RequestScope
from leangate.middleware.tracing import Tracing
from leangate.settings import Settings

log = logging.getLogger(__name__)

WATCH_AFTER_S = 0.5
"""A request still unanswered after this long gets a watcher that cancels it if its client
leaves (one on every request would cost the hot path; stages that fan out start it at once)."""
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class PurgeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str | None = None
    namespace: str | None = None


COMPLETION_PATHS: dict[str, Route] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
}


class LeanGateApp:
    """The ASGI entry point.

    ``POST`` to the completion routes goes straight to the gateway: on the hot path,
    FastAPI's routing, request object and middleware stack would cost more CPU than the
    rest of the proxy. ``POST`` to ``forward_paths`` (the backend's embeddings, tokenize,
    ...) is forwarded as it is (``forwarding.py``). Everything else, the lifespan
    included, is the FastAPI app's.
    """

    def __init__(self, api: FastAPI, forward_paths: Iterable[str] = ()) -> None:
        self.api = api
        self.forward_paths = frozenset(forward_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = COMPLETION_PATHS.get(scope["path"])
            if route is not None:
                response, ctx = await _complete(self.api.state, scope, receive, route)
                try:
                    await response(scope, receive, send)
                finally:
                    if ctx is not None and not ctx.scope.idle:
                        await ctx.scope.aclose()
                return
            if scope["path"] in self.forward_paths:
                state = self.api.state
                limit = state.settings.max_body_bytes
                response = await forward_call(state.gateway, limit, scope, receive)
                await response(scope, receive, send)
                return
        await self.api(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    transport: Transport | None = None,
    tracing: Tracing | None = None,
) -> LeanGateApp:
    """Build the app; heavy resources are opened in its lifespan, not here. ``transport``
    and ``tracing`` replace the backend connection and the span exporter (tests)."""
    settings = settings or Settings()
    policy = load_policy(settings.policy)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings, policy, transport, tracing) as runtime:
            app.state.gateway = runtime.gateway
            app.state.settings = settings
            gc.collect()
            gc.freeze()  # start-up objects live forever; keep the collector from rescanning them
            yield

    docs = "/docs" if settings.expose_docs else None
    app = FastAPI(
        title="leangate",
        lifespan=lifespan,
        docs_url=docs,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.expose_docs else None,
    )
    app.add_route("/v1/models", _models, methods=["GET"])
    app.add_route("/health", _health, methods=["GET"])
    app.add_route("/metrics", _metrics, methods=["GET"])
    app.add_route("/admin/cache/purge", _purge, methods=["POST"])
    app.add_route("/admin/cache/stats", _cache_stats, methods=["GET"])
    add_corpus_routes(app)
    add_admin_routes(app)
    describe_routes(app)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    return LeanGateApp(app, settings.forward_paths)


# --- completion routes -----------------------------------------------------------------------


async def _complete(
    state: State, scope: Scope, receive: Receive, route: Route
) -> tuple[Response, RequestContext | None]:
    gateway: Gateway = state.gateway
    started = time.perf_counter()
    headers = Headers(scope=scope)
    ctx: RequestContext | None = None
    labels = _Labels(route, "", "", started)  # model and tenant: unknown until prepared
    watch = ClientWatch(receive)
    timer: asyncio.TimerHandle | None = None
    try:
        tenant = await gateway.tenant_for(headers)
        limit = gateway.body_limit(tenant, state.settings.max_body_bytes)
        body = await read_body(receive, headers, limit)
        ctx = gateway.prepare(route, body, headers, tenant)
        labels = _Labels(route, ctx.model, gateway.tenant_label(ctx.tenant), started)
        ctx.scope.on_fanout = watch.start
        timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch.start)
        result = await gateway.execute(ctx)
        response = _render(result, ctx, gateway.services.metrics, labels)
    except asyncio.CancelledError:
        response = _cancelled(watch)
    except Exception as exc:
        if _is_unexpected(exc):
            log.exception("unexpected error on %s", route)
        response = error_response(exc)
    finally:
        if timer is not None:
            timer.cancel()
        watch.stop()
    gateway.services.metrics.request_done(
        route, response.status_code, time.perf_counter() - started, labels.model, labels.tenant
    )
    return response, ctx


def _cancelled(watch: ClientWatch) -> Response:
    """The answer to a request cancelled before its response started. The client watch
    cancels it when its client left; otherwise it is the server's drain deadline
    (``LEANGATE_DRAIN_TIMEOUT_S``: uvicorn cancels what is still running), and the request
    is answered with a 503 the client can retry elsewhere, not uvicorn's plain-text 500."""
    if watch.gone:
        watch.forget_cancel()
        return error_response(ClientGone("the client disconnected"))
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return error_response(ShuttingDown("the server is shutting down; retry the request"))


@dataclass(frozen=True, slots=True)
class _Labels:
    """What a response's metrics are labelled with, and when its request started."""

    route: Route
    model: str
    tenant: str
    started: float


class ClientWatch:
    """Cancels the request's task when its client disconnects.

    Started when a stage fans out (``RequestScope.on_fanout``: sub-requests should stop as
    soon as nobody waits for them), or once a request, or a stream after its headers, has
    waited ``WATCH_AFTER_S``; a watcher task on every request would cost the hot path.
    """

    __slots__ = ("_receive", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self._watcher: asyncio.Task[None] | None = None
        self.gone = False

    def start(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="client-watch")

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                if self._task is not None:
                    self._task.cancel()
                return

    def forget_cancel(self) -> None:
        if self._task is not None:
            self._task.uncancel()

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


def _is_unexpected(exc: Exception) -> bool:
    return not isinstance(exc, BackendError | ProxyError)


def _render(result: Result, ctx: RequestContext, metrics: Metrics, labels: _Labels) -> Response:
    headers = {**ctx.response_headers, **result.headers}
    if ctx.timings:
        headers["server-timing"] = server_timing(ctx.timings)
    if isinstance(result, StreamResult):
        return _EventStream(
            _sse(result, metrics, labels),
            {**SSE_HEADERS, **headers},
            request=ctx.scope,
            on_cut=metrics.stream_errors.labels(labels.route).inc,
        )
    return Response(result.body, result.status, headers=headers, media_type="application/json")


SHUTDOWN_EVENT = encode_event(
    stream_error_payload(ShuttingDown("the server is shutting down and cut this stream; retry"))
)


class _EventStream(StreamingResponse):
    """An event stream, sent chunk by chunk, that notices its client leaving and ends with
    an error event when the server cuts it.

    Starlette's own streaming response (ASGI spec 2.3, which uvicorn speaks) runs every
    stream in a task group beside a task listening for the client's disconnect, a fixed
    cost on every stream however short. Here that listener (a :class:`ClientWatch`) starts
    only once the stream has run ``WATCH_AFTER_S``, or at once when a stage fans out, so a
    short stream pays a timer; a client that leaves sooner costs at most that long of
    backend work (uvicorn drops what is sent to a closed connection).

    On SIGTERM uvicorn waits ``LEANGATE_DRAIN_TIMEOUT_S`` for the requests in flight, then
    cancels their tasks. A stream cancelled so after its headers went out sends the error
    event ``stream_error_payload`` writes for any failure mid-stream, then the end of the
    chunked body: the client reads an error and no ``[DONE]``, instead of a body cut short.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        headers: Mapping[str, str],
        *,
        request: RequestScope,
        on_cut: Callable[[], None],
    ) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers=headers)
        self._chunks = chunks
        self._request = request
        self._on_cut = on_cut
        self._open = False  # the headers are sent, the last part is not

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = ClientWatch(receive)
        timer: asyncio.TimerHandle | None = None
        if self._request.fanned_out:
            watch.start()
        else:
            self._request.on_fanout = watch.start
            timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch.start)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if watch.gone:  # the client left
                watch.forget_cancel()
            elif not self._open:
                raise
            else:
                self._open = False
                self._on_cut()
                await send(
                    {"type": "http.response.body", "body": SHUTDOWN_EVENT, "more_body": False}
                )
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            # cancelled while awaiting a send, the generator was left suspended: closing it
            # now releases the backend response instead of at garbage collection
            await aclose_quietly(self._chunks)
        finally:
            if timer is not None:
                timer.cancel()
            watch.stop()
            self._request.on_fanout = None

    async def stream_response(self, send: Send) -> None:
        """Starlette's, noting whether the stream is open (its chunks are all bytes)."""
        start: Message = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        await send(start)
        self._open = True
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        self._open = False
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def server_timing(timings: dict[str, float]) -> str:
    """Each stage's own time (and its parts) as a ``Server-Timing`` header, in ms."""
    return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in timings.items())


async def _sse(result: StreamResult, metrics: Metrics, labels: _Labels) -> AsyncIterator[bytes]:
    """The result as SSE bytes; a failure mid-stream becomes a final error event."""
    route = labels.route
    if result.upstream is not None:
        source = _RawRelay(result.upstream).chunks()
    else:
        source = _framed(result.events)
    first = True
    try:
        async for piece in source:
            if first:
                first = False
                waited = time.perf_counter() - labels.started
                metrics.first_event(route, labels.model, labels.tenant, waited)
            yield piece
    except Exception as exc:
        if _is_unexpected(exc):
            log.exception("unexpected error mid-stream on %s", route)
        metrics.stream_errors.labels(route).inc()
        yield encode_event(stream_error_payload(exc))
    finally:
        await aclose_quietly(result.events)
        if result.upstream is not None:
            await result.upstream.aclose()


async def _framed(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for payload in events:
        yield encode_event(payload)
    yield DONE_EVENT


class _RawRelay:
    """The backend's SSE bytes, forwarded as they arrive (no stage reads the events).

    Only whole events are forwarded (a chunk's bytes after its last blank line wait for
    the next chunk), and a stream that ends without ``[DONE]`` raises: the client then gets
    a clean error event after the last whole event, never an answer that looks complete.
    """

    __slots__ = ("_response", "_tail")

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response
        self._tail = b""

    async def chunks(self) -> AsyncIterator[bytes]:
        pending = b""
        async for chunk in self._response.iter_chunks():
            data = pending + chunk if pending else chunk
            end = _after_last_event(data)
            if end:
                whole = data if end == len(data) else data[:end]
                self._tail = (self._tail + whole[-16:])[-16:]
                yield whole
            pending = data[end:]
        if not self._tail.rstrip(b"\r\n").endswith(b"data: [DONE]"):
            raise BackendProtocolError("the backend's stream ended before [DONE]")


_BLANK_LINES = (b"\n\n", b"\r\r", b"\n\r", b"\r\n\r\n", b"\n\r\n", b"\r\r\n")
"""Every blank line holds ``\\n\\n``, ``\\r\\r`` or ``\\n\\r`` (two line endings in a row;
``\\r\\n`` is one); the longer ones take the blank line's ``\\n`` along when it is there."""


def _after_last_event(data: bytes) -> int:
    """The offset just past the last blank line (the end of an event), 0 if none."""
    separators = _BLANK_LINES if b"\r" in data else (b"\n\n",)
    ends = [found + len(sep) for sep in separators if (found := data.rfind(sep)) >= 0]
    return max(ends, default=0)


# --- other routes ----------------------------------------------------------------------------


async def _models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    if not gateway.backend.ready:
        return error(503, "no backend replica is healthy", "service_unavailable")
    return JSONResponse({"object": "list", "data": gateway.backend.model_cards()})


async def _health(request: Request) -> Response:
    """Status for anyone; each replica's URL, load and models only for the admin key."""
    gateway: Gateway = request.app.state.gateway
    backend = gateway.backend
    cache = gateway.services.cache
    body: dict[str, object] = {
        "status": "ok" if backend.ready else "unavailable",
        "replicas_healthy": sum(1 for r in backend.replicas if r.healthy),
        "replicas": len(backend.replicas),
        "cache": {"store": cache.store.kind, "available": not cache.breaker.open},
    }
    if is_admin(request, request.app.state.settings):
        body["replicas"] = [
            {
                "url": r.url,
                "healthy": r.healthy,
                "outstanding": r.outstanding,
                "models": sorted(r.models),
            }
            for r in backend.replicas
        ]
    return JSONResponse(body, status_code=200 if backend.ready else 503)


async def _metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    metrics = gateway.services.metrics
    metrics.backend_state(gateway.backend.replicas)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


async def _purge(request: Request) -> Response:
    """Delete cached entries of a tenant and/or namespace; needs the admin key."""
    gateway: Gateway = request.app.state.gateway
    refused = admin_refusal(request)
    if refused is not None:
        return refused
    try:
        body = PurgeRequest.model_validate_json(await request.body())
        deleted = await purge(
            gateway.services.cache.store, tenant=body.tenant, namespace=body.namespace
        )
    except ValidationError as exc:
        return error(400, describe_validation_error(exc), "invalid_request_error")
    except ValueError as exc:
        return error(400, str(exc), "invalid_request_error")
    except StoreError as exc:
        log.warning("purging cache entries failed: %r", exc)
        return error(503, "the cache store cannot answer; retry", "service_unavailable")
    return JSONResponse({"deleted": deleted})


async def _cache_stats(request: Request) -> Response:
    """Entries stored (all replicas', for a tenant and/or namespace) and this replica's
    lookups since it started; needs the admin key."""
    gateway: Gateway = request.app.state.gateway
    refused = admin_refusal(request)
    if refused is not None:
        return refused
    cache = gateway.services.cache
    params = request.query_params
    try:
        counts = await count_entries(
            cache.store, tenant=params.get("tenant"), namespace=params.get("namespace")
        )
    except StoreError as exc:
        log.warning("counting cache entries failed: %r", exc)
        return error(503, "the cache store cannot answer; retry", "service_unavailable")
    return JSONResponse(
        {
            "store": cache.store.kind,
            "entries": counts.as_dict(),
            "lookups": gateway.services.metrics.cache_lookup_counts(),
        }
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    error_type = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return error(exc.status_code, str(exc.detail), error_type)
