"""``leangate.Pipeline``: the proxy's stages inside an app, with no proxy in between.

The pipeline opens the proxy's own runtime (``middleware/runtime.py``) and drives its
``Gateway`` as the HTTP edge does (``middleware/app.py:_complete``): the same policy, the
same stages, the same error payloads, turned into the openai package's types instead of
HTTP. See README, "Python SDK".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

import openai
import orjson
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, ValidationError

from leangate.backend.errors import BackendError
from leangate.backend.transport import Transport
from leangate.middleware.app import server_timing
from leangate.middleware.context import JsonResult, RequestContext, Result, StreamResult
from leangate.middleware.errors import ProxyError
from leangate.middleware.gateway import Gateway
from leangate.middleware.metrics import Metrics
from leangate.middleware.policy import Policy
from leangate.middleware.protocol import RequestOptions, Route
from leangate.middleware.runtime import Runtime, open_runtime
from leangate.sdk.errors import invalid_answer, request_error, status_error, timeout_error
from leangate.sdk.policies import resolve_policy
from leangate.sdk.streams import ChunkStream, lenient
from leangate.settings import Settings

if TYPE_CHECKING:
    from leangate.sdk.sync import SyncPipeline

log = logging.getLogger(__name__)

T = TypeVar("T")
W = TypeVar("W", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)
OptionsArg = RequestOptions | Mapping[str, Any] | None


class RawResponse(Generic[T]):
    """An answer with the response headers the proxy would have sent with it.

    What ``with_raw_response.create`` returns, as in the openai client: ``parse()`` gives
    the answer (a ``ChatCompletion``, ``Completion`` or ``ChunkStream``); ``headers`` has
    the proxy's ``x-leangate-*`` headers and ``server-timing``, names in lower case.
    """

    __slots__ = ("_parsed", "headers")
    status_code = 200

    def __init__(self, parsed: T, headers: dict[str, str]) -> None:
        self._parsed = parsed
        self.headers = headers

    def parse(self) -> T:
        return self._parsed


@dataclass(frozen=True, slots=True)
class _Call:
    route: Route
    body: bytes
    headers: dict[str, str]
    timeout: float | None


class Pipeline:
    """The proxy's stages, run in this process against one or more vLLM replicas.

    ``async with Pipeline(["http://gpu-1:8000"], "policy.yaml") as lg:`` opens what the
    policy needs (the caches, the embedder, corpora, a watcher of the policy file) and
    closes it on exit. ``lg.chat.completions.create`` and ``lg.completions.create`` take
    what the openai client's do and return its types. ``api_key`` stands for the
    client's key: it picks the tenant, as the proxy's ``Authorization`` header does.

    Nothing comes from the environment: ``settings`` (``leangate.settings.Settings``,
    which does read ``LEANGATE_*``) gives the rest of the proxy's settings; the
    arguments override its backend URLs, Redis URL and policy.
    """

    def __init__(
        self,
        backend_urls: str | Sequence[str],
        policy: Policy | str | os.PathLike[str] | None = None,
        *,
        redis_url: str | None = None,
        api_key: str | None = None,
        settings: Settings | None = None,
        transport: Transport | None = None,
    ) -> None:
        base = settings or Settings.model_construct()
        self.policy, path = resolve_policy(policy if policy is not None else base.policy)
        urls = [backend_urls] if isinstance(backend_urls, str) else list(backend_urls)
        update: dict[str, Any] = {"backend_url": ",".join(urls), "policy": path}
        if redis_url is not None:
            update["redis_url"] = redis_url
        self.settings = base.model_copy(update=update)
        self._transport = transport
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._runtime: Runtime | None = None
        self._streams: weakref.WeakSet[ChunkStream[Any]] = weakref.WeakSet()
        self.chat = Chat(self)
        self.completions = Completions(self, "completions", Completion, Completion)

    async def __aenter__(self) -> Pipeline:
        if self._stack is not None:
            raise RuntimeError("the pipeline is already open")
        stack = contextlib.AsyncExitStack()
        runtime = open_runtime(self.settings, self.policy, self._transport)
        self._runtime = await stack.enter_async_context(runtime)
        stack.push_async_callback(self._close_streams)
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        self._runtime = None

    def sync(self) -> SyncPipeline:
        """This pipeline for synchronous code, on an event loop of its own (see
        ``SyncPipeline``)."""
        from leangate.sdk.sync import SyncPipeline

        return SyncPipeline(self)

    @property
    def metrics(self) -> Metrics:
        """The proxy's metrics for this pipeline's requests (``metrics.render()`` is the
        text ``/metrics`` would serve)."""
        return self._gateway().services.metrics

    def _gateway(self) -> Gateway:
        if self._runtime is None:
            raise RuntimeError("open the pipeline first: `async with Pipeline(...) as lg:`")
        return self._runtime.gateway

    async def _close_streams(self) -> None:
        for stream in list(self._streams):
            await stream.close()

    # --- one request, as middleware/app.py:_complete runs it --------------------------------

    async def _send(
        self, call: _Call, whole: type[W], chunk: type[C]
    ) -> RawResponse[W] | RawResponse[ChunkStream[C]]:
        gateway = self._gateway()
        deadline = asyncio.timeout(call.timeout)
        try:
            async with deadline:
                result, ctx = await _execute(gateway, call)
                headers = _response_headers(result, ctx)
                if isinstance(result, StreamResult):
                    stream = ChunkStream(
                        result,
                        ctx.scope,
                        chunk,
                        call.route,
                        headers,
                        gateway.services.metrics.stream_errors.labels(call.route).inc,
                    )
                    self._streams.add(stream)
                    return RawResponse(stream, headers)
                return RawResponse(await _whole(result, ctx, whole, call.route), headers)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise timeout_error(call.route) from None

    def _call(
        self,
        route: Route,
        body: dict[str, Any],
        options: OptionsArg,
        extra_headers: Mapping[str, str] | None,
        extra_body: Mapping[str, Any] | None,
        timeout: float | None,
    ) -> _Call:
        body = {k: v for k, v in body.items() if not isinstance(v, openai.NotGiven | openai.Omit)}
        field = _options_field(options)
        if field:
            body["leangate"] = field
        body.update(extra_body or {})
        headers = dict(self._headers)
        headers.update({k.lower(): v for k, v in (extra_headers or {}).items()})
        return _Call(route, orjson.dumps(body, default=_jsonable), headers, timeout)


async def _execute(gateway: Gateway, call: _Call) -> tuple[Result, RequestContext]:
    metrics = gateway.services.metrics
    started = time.perf_counter()
    labels = ("", "")
    try:
        tenant = await gateway.tenant_for(call.headers)
        ctx = gateway.prepare(call.route, call.body, call.headers, tenant)
        labels = (ctx.model, gateway.tenant_label(ctx.tenant))
        result = await gateway.execute(ctx)
    except Exception as exc:
        if not isinstance(exc, BackendError | ProxyError):
            log.exception("unexpected error on %s", call.route)
        error = request_error(call.route, exc)
        metrics.request_done(call.route, error.status_code, time.perf_counter() - started, *labels)
        raise error from exc
    status = result.status if isinstance(result, JsonResult) else 200
    metrics.request_done(call.route, status, time.perf_counter() - started, *labels)
    return result, ctx


async def _whole(result: JsonResult, ctx: RequestContext, whole: type[W], route: Route) -> W:
    """The answer as ``whole``; the request's scope is closed once it is read, as the
    proxy closes it once the response was sent."""
    try:
        if result.status >= 400:
            raise status_error(route, result.status, result.body)
        try:
            return whole.model_validate_json(result.body)
        except ValidationError:
            return lenient(whole, orjson.loads(result.body))
    except (TypeError, orjson.JSONDecodeError):
        raise invalid_answer(route, result.body) from None
    finally:
        await ctx.scope.aclose()


def _response_headers(result: Result, ctx: RequestContext) -> dict[str, str]:
    merged = {**ctx.response_headers, **result.headers}
    headers = {name.lower(): value for name, value in merged.items()}
    if ctx.timings:
        headers["server-timing"] = server_timing(ctx.timings)
    return headers


def _options_field(options: OptionsArg) -> dict[str, Any] | None:
    if isinstance(options, RequestOptions):
        return options.model_dump(mode="json", exclude_defaults=True)
    return dict(options) if options else None


def _jsonable(value: object) -> Any:
    """What orjson cannot write itself: pydantic models among the messages (an earlier
    ``ChatCompletionMessage``, say), written as the openai client writes them."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    raise TypeError(f"cannot send a {type(value).__name__} as JSON")


# --- the openai client's surface -------------------------------------------------------------


class RawCompletions(Generic[W, C]):
    """``create`` returning a ``RawResponse``: the answer and its response headers."""

    def __init__(self, pipeline: Pipeline, route: Route, whole: type[W], chunk: type[C]) -> None:
        self._pipeline = pipeline
        self._route = route
        self._whole = whole
        self._chunk = chunk

    @overload
    async def create(
        self,
        *,
        model: str,
        stream: Literal[False] = False,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the openai client's parameter)
        **params: Any,
    ) -> RawResponse[W]: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        stream: Literal[True],
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the openai client's parameter)
        **params: Any,
    ) -> RawResponse[ChunkStream[C]]: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        stream: bool,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the openai client's parameter)
        **params: Any,
    ) -> RawResponse[W] | RawResponse[ChunkStream[C]]: ...

    async def create(
        self,
        *,
        model: str,
        stream: bool = False,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the openai client's parameter)
        **params: Any,
    ) -> RawResponse[W] | RawResponse[ChunkStream[C]]:
        """``params`` are the OpenAI request's fields (``messages`` or ``prompt``,
        ``max_tokens``, ...); ``leangate`` is the request's ``Options``."""
        body = {"model": model, **({"stream": True} if stream else {}), **params}
        call = self._pipeline._call(self._route, body, leangate, extra_headers, extra_body, timeout)
        return await self._pipeline._send(call, self._whole, self._chunk)


class Completions(Generic[W, C]):
    """``lg.chat.completions`` and ``lg.completions``, as in the openai client."""

    def __init__(self, pipeline: Pipeline, route: Route, whole: type[W], chunk: type[C]) -> None:
        self.with_raw_response = RawCompletions(pipeline, route, whole, chunk)

    @overload
    async def create(
        self,
        *,
        model: str,
        stream: Literal[False] = False,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the openai client's parameter)
        **params: Any,
    ) -> W: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        stream: Literal[True],
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the openai client's parameter)
        **params: Any,
    ) -> ChunkStream[C]: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        stream: bool,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the openai client's parameter)
        **params: Any,
    ) -> W | ChunkStream[C]: ...

    async def create(
        self,
        *,
        model: str,
        stream: bool = False,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the openai client's parameter)
        **params: Any,
    ) -> W | ChunkStream[C]:
        """The answer (``stream=False``) or its chunks; headers: ``with_raw_response``."""
        raw = await self.with_raw_response.create(
            model=model,
            stream=stream,
            leangate=leangate,
            extra_headers=extra_headers,
            extra_body=extra_body,
            timeout=timeout,
            **params,
        )
        return raw.parse()


class Chat:
    def __init__(self, pipeline: Pipeline) -> None:
        self.completions = Completions(pipeline, "chat", ChatCompletion, ChatCompletionChunk)
