"""``Pipeline.sync()``: the pipeline for synchronous code.

The pipeline's services (backend connections, background health checks, the policy
watcher, Redis clients) belong to one event loop, so the synchronous twin runs a loop of
its own in a thread and hands each call to it. Calls from several threads are fine: they
all run on that loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from leangate.sdk.pipeline import Completions, OptionsArg, RawResponse
from leangate.sdk.streams import ChunkStream

if TYPE_CHECKING:
    from leangate.middleware.metrics import Metrics
    from leangate.sdk.pipeline import Pipeline

T = TypeVar("T")
W = TypeVar("W", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)


class SyncPipeline:
    """``with Pipeline(...).sync() as lg:`` then ``lg.chat.completions.create(...)``, as
    with ``openai.OpenAI``. Streams are iterators of chunks (``SyncChunkStream``)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.chat = SyncChat(self)
        self.completions = SyncCompletions(self, pipeline.completions)

    def __enter__(self) -> SyncPipeline:
        if self._loop is not None:
            raise RuntimeError("the pipeline is already open")
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="leangate", daemon=True)
        self._thread.start()
        self._loop = loop
        try:
            self.run(self.pipeline.__aenter__())
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.run(self.pipeline.__aexit__(exc_type, exc, tb))
        finally:
            self._stop()

    @property
    def metrics(self) -> Metrics:
        return self.pipeline.metrics

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the pipeline's loop and wait for it; interrupting the wait
        (Ctrl-C) cancels it."""
        if self._loop is None:
            work.close()
            raise RuntimeError("open the pipeline first: `with Pipeline(...).sync() as lg:`")
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = None
        asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class SyncChunkStream(Generic[C]):
    """A ``ChunkStream`` for synchronous code: iterate it, or ``close()`` it early (also
    ``with``)."""

    def __init__(self, stream: ChunkStream[C], owner: SyncPipeline) -> None:
        self._stream = stream
        self._owner = owner
        self.headers = stream.headers

    def __iter__(self) -> Iterator[C]:
        return self

    def __next__(self) -> C:
        try:
            return self._owner.run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._owner.run(self._stream.close())

    def __enter__(self) -> SyncChunkStream[C]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncRawCompletions(Generic[W, C]):
    def __init__(self, owner: SyncPipeline, completions: Completions[W, C]) -> None:
        self._owner = owner
        self._raw = completions.with_raw_response

    @overload
    def create(
        self,
        *,
        model: str,
        stream: Literal[False] = False,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> RawResponse[W]: ...

    @overload
    def create(
        self,
        *,
        model: str,
        stream: Literal[True],
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> RawResponse[SyncChunkStream[C]]: ...

    @overload
    def create(
        self,
        *,
        model: str,
        stream: bool,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> RawResponse[W] | RawResponse[SyncChunkStream[C]]: ...

    def create(
        self,
        *,
        model: str,
        stream: bool = False,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> RawResponse[W] | RawResponse[SyncChunkStream[C]]:
        raw = self._owner.run(
            self._raw.create(
                model=model,
                stream=stream,
                leangate=leangate,
                extra_headers=extra_headers,
                extra_body=extra_body,
                timeout=timeout,
                **params,
            )
        )
        answer = raw.parse()
        if isinstance(answer, ChunkStream):
            return RawResponse(SyncChunkStream(answer, self._owner), raw.headers)
        return RawResponse(answer, raw.headers)


class SyncCompletions(Generic[W, C]):
    def __init__(self, owner: SyncPipeline, completions: Completions[W, C]) -> None:
        self.with_raw_response = SyncRawCompletions(owner, completions)

    @overload
    def create(
        self,
        *,
        model: str,
        stream: Literal[False] = False,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> W: ...

    @overload
    def create(
        self,
        *,
        model: str,
        stream: Literal[True],
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> SyncChunkStream[C]: ...

    @overload
    def create(
        self,
        *,
        model: str,
        stream: bool,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> W | SyncChunkStream[C]: ...

    def create(
        self,
        *,
        model: str,
        stream: bool = False,
        leangate: OptionsArg = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> W | SyncChunkStream[C]:
        raw = self.with_raw_response.create(
            model=model,
            stream=stream,
            leangate=leangate,
            extra_headers=extra_headers,
            extra_body=extra_body,
            timeout=timeout,
            **params,
        )
        return raw.parse()


class SyncChat:
    def __init__(self, owner: SyncPipeline) -> None:
        self.completions: SyncCompletions[ChatCompletion, ChatCompletionChunk] = SyncCompletions(
            owner, owner.pipeline.chat.completions
        )
