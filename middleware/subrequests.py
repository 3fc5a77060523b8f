"""Backend calls a stage makes on behalf of its request, and answers built from them.

``ctx.subrequests`` (inside a stage) sends requests derived from the client's: they carry
its tenant, options, model and prompt-prefix affinity, are counted in ``/metrics`` and in
the request's usage, and are not charged to the stage's budget (its clock stops while
they run, however many overlap). Each goes either straight to the backend or, with
``through_chain=True``, through the rest of the chain (so the cache can answer it).

Everything a sub-request holds belongs to the request's scope: when the client goes away,
or the response is finished or dropped, running sub-requests are cancelled, which aborts
them in vLLM.

    sub = ctx.subrequests
    a, b = await sub.gather([body_a, body_b])               # two plain answers at once
    parts = [sub.stream(body) for body in point_bodies]     # all started now
    return sub.join([Part(p, before=f"{i}. ") for i, p in enumerate(parts, 1)])

``join`` streams the parts in order, each as soon as the ones before it are done, while
later parts are still being generated. The parts may also come from an async iterator
(an async generator that starts each part when it knows what to ask, e.g. as an outline
streams in): ``join`` pulls it ahead in a task of its own, so a part is started as soon as
the iterator yields it, not when the client has read the parts before it. Before its first
byte it fails open (the client gets the answer the rest of the chain gives, as if the
stage were off); after it, a failure ends the stream with an error event, never with
``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from leangate.backend.errors import BackendProtocolError, BackendTimeout
from leangate.backend.profile import Sample
from leangate.middleware.answers import ChunkWriter, delta_text, finish_reason
from leangate.middleware.context import (
    JsonResult,
    RequestContext,
    Result,
    StreamResult,
    close_stream,
)
from leangate.middleware.endpoint import forward
from leangate.middleware.pipeline import StageClock, StageFrame, current_frame
from leangate.middleware.protocol import Route


class SubRequests:
    """The sub-request API of the stage running for ``ctx`` (see the module docstring)."""

    def __init__(self, ctx: RequestContext) -> None:
        frame = current_frame()
        if frame is None:
            raise RuntimeError("ctx.subrequests is only available while a stage runs")
        self.ctx = ctx
        self.frame = frame

    # --- plain answers -----------------------------------------------------------------------

    async def complete(
        self, body: dict[str, Any], *, route: Route | None = None, through_chain: bool = False
    ) -> dict[str, Any]:
        """Send ``body`` (a request body; ``model`` defaults to the client's) and return
        the decoded answer. Backend failures raise from ``leangate.backend.errors``."""
        sub = self._derive(body, route, stream=False)
        outcome = "error"
        answer: dict[str, Any] = {}
        try:
            async with self.frame.clock.waiting():
                result = await self._send(sub, through_chain)
            answer = _decode(result)
            outcome = "ok"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._count("plain", outcome, answer.get("usage"))
        return answer

    async def gather(
        self,
        bodies: Sequence[dict[str, Any]],
        *,
        route: Route | None = None,
        through_chain: bool = False,
    ) -> list[dict[str, Any]]:
        """``complete`` for every body at once; the first failure cancels the rest."""
        tasks = [
            asyncio.ensure_future(self.complete(b, route=route, through_chain=through_chain))
            for b in bodies
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # --- streams -----------------------------------------------------------------------------

    def stream(
        self,
        body: dict[str, Any],
        *,
        route: Route | None = None,
        through_chain: bool = False,
        budget_s: float | None = None,
    ) -> SubStream:
        """Start a streamed sub-request now; read its chunks with ``async for``.

        ``budget_s`` bounds the whole stream from now: past it, reading raises
        ``BackendTimeout`` and the request is cancelled.
        """
        sub = self._derive(body, route, stream=True)
        return SubStream(self, sub, through_chain, budget_s)

    def join(
        self, parts: Sequence[Part] | AsyncIterable[Part], *, finish: str | None = None
    ) -> StreamResult:
        """The client's stream: each part's text in order (see the module docstring).

        ``finish`` is the final finish reason; by default the last part's.
        """
        if isinstance(parts, Sequence):
            return StreamResult(_joined(self, _Parts.given(parts), finish))
        return StreamResult(_joined(self, _Parts.pulled(self.ctx, parts), finish))

    # --- internals ---------------------------------------------------------------------------

    def _derive(self, body: dict[str, Any], route: Route | None, *, stream: bool) -> RequestContext:
        body = {**body, "stream": stream}
        if stream:
            options = body.get("stream_options") or {}
            body["stream_options"] = {**options, "include_usage": True}
        else:
            body.pop("stream_options", None)
        sub = self.ctx.derive(body, route)
        self.ctx.scope.fanout_started()
        return sub

    async def _send(self, sub: RequestContext, through_chain: bool) -> Result:
        if through_chain:
            return await self.frame.next_handler(sub)
        return await forward(sub)

    def _count(self, kind: str, outcome: str, usage: object) -> None:
        self.ctx.scope.usage.add(usage)
        observer = self.frame.observer
        report = getattr(observer, "subrequest_done", None)
        if report is not None:
            report(self.frame.stage, kind, outcome, usage)


def _decode(result: Result) -> dict[str, Any]:
    if not isinstance(result, JsonResult):
        raise BackendProtocolError("a plain sub-request was answered with a stream")
    try:
        answer = orjson.loads(result.body)
    except orjson.JSONDecodeError as exc:
        raise BackendProtocolError("the backend's answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise BackendProtocolError("the backend's answer is not a JSON object")
    return answer


class _End:
    """Put in a stream's queue when it ended (``error`` set when it failed)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class SubStream:
    """A streamed sub-request, started at once and buffered, so many run concurrently
    while the client's stream reads them one after another.

    Iterating yields each chunk decoded; the final usage-only chunk is kept in ``usage``.
    ``started``, ``first_token_s`` and ``done_s`` (seconds since ``started``) time it.
    """

    def __init__(
        self,
        owner: SubRequests,
        ctx: RequestContext,
        through_chain: bool,
        budget_s: float | None,
    ) -> None:
        self._owner = owner
        self._clock = owner.frame.clock
        self._queue: asyncio.Queue[dict[str, Any] | _End] = asyncio.Queue()
        self._ended = False
        self.budget_s = budget_s
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.done_s: float | None = None
        self.usage: dict[str, Any] | None = None
        self._batch: list[float] = []
        self._ctx = ctx
        self._deadline = None if budget_s is None else self.started + budget_s
        self._task = ctx.scope.spawn(self._pump(ctx, through_chain), name="subrequest-stream")

    async def _pump(self, ctx: RequestContext, through_chain: bool) -> None:
        outcome = "error"
        try:
            result = await self._owner._send(ctx, through_chain)
            if not isinstance(result, StreamResult):
                raise BackendProtocolError("a streamed sub-request was answered whole")
            try:
                async for payload in result.events:
                    self._take(orjson.loads(payload))
            finally:
                await close_stream(result)
            outcome = "ok"
            self._queue.put_nowait(_End())
            self._teach_profile()
        except asyncio.CancelledError:
            outcome = "cancelled"
            self._queue.put_nowait(_End(BackendTimeout("the sub-request was cancelled")))
            raise
        except Exception as exc:
            self._queue.put_nowait(_End(exc))
        finally:
            self.done_s = time.perf_counter() - self.started
            self._owner._count("stream", outcome, self.usage)

    def _take(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            raise BackendProtocolError("a stream event is not a JSON object")
        if "error" in chunk:
            raise BackendProtocolError(f"the backend's stream failed: {chunk['error']}")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if not chunk.get("choices"):
            return
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
            self._batch.append(self._ctx.backend.batch_size(self._ctx.model))
        self._queue.put_nowait(chunk)

    def _teach_profile(self) -> None:
        """A finished stream is a sample of the backend's speed at its batch size."""
        usage = self.usage or {}
        if self.first_token_s is None or not usage:
            return
        self._batch.append(self._ctx.backend.batch_size(self._ctx.model) + 1)
        self._ctx.backend.profile.observe(
            Sample(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                ttft_s=self.first_token_s,
                total_s=time.perf_counter() - self.started,
                batch=sum(self._batch) / len(self._batch),
            )
        )

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._ended:
            raise StopAsyncIteration
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            async with self._clock.waiting():
                item = await self._next_before_deadline()
        if isinstance(item, _End):
            self._ended = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    async def _next_before_deadline(self) -> dict[str, Any] | _End:
        if self._deadline is None:
            return await self._queue.get()
        left = self._deadline - time.perf_counter()
        try:
            return await asyncio.wait_for(self._queue.get(), max(left, 0.0))
        except TimeoutError:
            self.close()
            raise BackendTimeout(
                f"a sub-request ran over its budget of {self.budget_s:.1f}s"
            ) from None

    async def text(self) -> tuple[str, str | None]:
        """Read the whole stream: its text and finish reason."""
        route = self._owner.ctx.route
        pieces: list[str] = []
        reason: str | None = None
        async for chunk in self:
            pieces.append(delta_text(route, chunk))
            reason = finish_reason(chunk) or reason
        return "".join(pieces), reason

    def close(self) -> None:
        """Stop the sub-request (vLLM aborts it) if it is still running."""
        self._task.cancel()


@dataclass
class Part:
    """One piece of a joined answer: ``before`` (a heading, a separator), then the text
    of ``stream``, if any. ``before`` is held back until the stream's first token, so a
    part that fails before it never leaves a dangling heading.

    ``stream`` is a ``SubStream`` or any async iterable of chunks shaped like the
    backend's (``choices[0].delta.content`` or ``choices[0].text``); one with a
    ``close()`` method is closed when the joined stream ends."""

    stream: AsyncIterable[dict[str, Any]] | None = None
    before: str = ""

    def close(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()


class _Parts:
    """The parts of a join, in order: a given list, or pulled ahead from an async
    iterator by a task of the request's scope into a queue."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Part | _End] = asyncio.Queue()
        self._seen: list[Part] = []
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def given(cls, parts: Sequence[Part]) -> _Parts:
        given = cls()
        for part in parts:
            given._queue.put_nowait(part)
        given._queue.put_nowait(_End())
        return given

    @classmethod
    def pulled(cls, ctx: RequestContext, parts: AsyncIterable[Part]) -> _Parts:
        pulled = cls()
        pulled._task = ctx.scope.spawn(pulled._pull(parts), name="join-parts")
        return pulled

    async def _pull(self, parts: AsyncIterable[Part]) -> None:
        try:
            async for part in parts:
                self._queue.put_nowait(part)
        except Exception as exc:
            self._queue.put_nowait(_End(exc))
        else:
            self._queue.put_nowait(_End())

    async def next(self, clock: StageClock) -> Part | None:
        """The next part; None after the last. Raises what the iterator raised."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            async with clock.waiting():
                item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)
            if item.error is not None:
                raise item.error
            return None
        self._seen.append(item)
        return item

    def close(self) -> None:
        """Stop pulling, and every part started so far."""
        if self._task is not None:
            self._task.cancel()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Part):
                self._seen.append(item)
        for part in self._seen:
            part.close()


async def _joined(owner: SubRequests, parts: _Parts, finish: str | None) -> AsyncIterator[bytes]:
    ctx, frame = owner.ctx, owner.frame
    writer = ChunkWriter(ctx.route, ctx.model)
    sent = False
    last_reason = "stop"
    try:
        while (part := await parts.next(frame.clock)) is not None:
            pending = part.before
            if part.stream is not None:
                async for chunk in part.stream:
                    piece = pending + delta_text(ctx.route, chunk)
                    pending = ""
                    last_reason = finish_reason(chunk) or last_reason
                    if piece:
                        sent = True
                        yield writer.text(piece)
            if pending:
                sent = True
                yield writer.text(pending)
        yield writer.finish(finish or last_reason)
        options = ctx.body.get("stream_options") or {}
        if options.get("include_usage"):
            yield writer.usage(ctx.scope.usage.as_dict())
    except Exception as exc:
        if sent:
            raise
        async for payload in _as_if_off(frame, exc):
            yield payload
    finally:
        parts.close()


async def _as_if_off(frame: StageFrame, exc: Exception) -> AsyncIterator[bytes]:
    """Fail open before the first byte: the rest of the chain's stream for the request as
    the stage received it."""
    reason = "timeout" if isinstance(exc, BackendTimeout | TimeoutError) else "error"
    frame.failed_open(reason, exc)
    result = await frame.as_if_off()
    if not isinstance(result, StreamResult):
        raise BackendProtocolError("the fallback for a streamed request was not a stream")
    try:
        async for payload in result.events:
            yield payload
    finally:
        await close_stream(result)
