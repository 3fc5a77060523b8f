"""The stage pipeline: each stage wraps the rest of the chain, and the chain is built once.

A stage is ``async (ctx, call_next) -> Result``. It may change the request before calling
``call_next``, answer without calling it (a cache hit), call it and change the result, or
call the backend itself, several times at once, through ``ctx.subrequests``.
``build_chain`` wraps every stage in a ``Guard`` that times it and makes it fail open:

- an exception or a time-budget overrun undoes the stage's change to the request and runs
  the rest of the chain as if the stage were off; only a stage that left the request as
  it was (it observed or wrapped the answer, as the cache does) gets back the answer
  ``call_next(ctx)`` already returned, instead of paying for it twice;
- an error raised by ``call_next(ctx)`` (the backend's, for this request) reaches the stage
  as it is, so ``except BackendError`` works; if the stage lets it through, so does the
  guard.

A failed stage's sub-answers are never sent: not those of calls with a derived context
(``ctx.derive(...)``, a sub-request through the rest of the chain), nor the answer to a
request it had rewritten (a skeleton prompt, say).

The budget counts only the stage's own time: wall time minus the union of its waits
(``call_next``, sub-requests, and ``async with ctx.pause_budget():``), correct when waits
overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

from leangate.middleware.context import RequestContext, Result, StreamResult, close_stream
from leangate.middleware.tracing import Tracing

log = logging.getLogger(__name__)

Handler = Callable[[RequestContext], Awaitable[Result]]


class Stage(Protocol):
    name: str

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result: ...


class StageObserver(Protocol):
    """Where the guard reports (metrics); a no-op observer is used in tests."""

    def stage_timed(self, stage: str, seconds: float) -> None: ...

    def stage_failed_open(self, stage: str, reason: str) -> None: ...


class NullObserver:
    def stage_timed(self, stage: str, seconds: float) -> None:
        pass

    def stage_failed_open(self, stage: str, reason: str) -> None:
        pass


class StageClock:
    """A stage's own time: wall time minus the union of the intervals it spends waiting.

    Waits may overlap (eight sub-requests at once): the clock stops when the first starts
    and runs again when the last ends. While it is stopped the budget's deadline is off;
    when it runs again the deadline is what is left of the budget. After the guard
    returned (``detach``), waits are still accounted but no deadline is moved.
    """

    __slots__ = ("_deadline", "_wait_started", "_waiting", "budget_s", "started", "waited_s")

    def __init__(self, budget_s: float | None, deadline: asyncio.Timeout | None) -> None:
        self.budget_s = budget_s
        self._deadline = deadline
        self.started = time.perf_counter()
        self.waited_s = 0.0
        self._waiting = 0
        self._wait_started = 0.0

    def own_s(self) -> float:
        now = time.perf_counter()
        waited = self.waited_s + (now - self._wait_started if self._waiting else 0.0)
        return now - self.started - waited

    def enter_wait(self) -> None:
        if self._waiting == 0:
            self._wait_started = time.perf_counter()
            self._reschedule(None)
        self._waiting += 1

    def leave_wait(self) -> None:
        self._waiting -= 1
        if self._waiting:
            return
        self.waited_s += time.perf_counter() - self._wait_started
        if self.budget_s is not None:
            left = max(self.budget_s - self.own_s(), 0.0)
            self._reschedule(asyncio.get_running_loop().time() + left)

    def _reschedule(self, when: float | None) -> None:
        """Move the deadline, unless it already fired: the stage is then being cancelled
        for overrunning its budget, and fails open."""
        if self._deadline is not None and not self._deadline.expired():
            self._deadline.reschedule(when)

    @contextlib.asynccontextmanager
    async def waiting(self) -> AsyncIterator[None]:
        self.enter_wait()
        try:
            yield
        finally:
            self.leave_wait()

    def detach(self) -> None:
        self._deadline = None


@dataclass(eq=False)
class StageFrame:
    """One stage running for one request: what its sub-requests and streams need."""

    stage: str
    ctx: RequestContext
    clock: StageClock
    next_handler: Handler
    observer: StageObserver
    saved: tuple[object, ...] = ()
    """The request as the stage received it (``ctx.snapshot()``), for failing open."""
    answers: list[tuple[Result, bool]] = field(default_factory=list)
    """What ``call_next(ctx)`` returned, and whether the request was still the one the
    stage received."""
    pending: int = 0
    downstream_errors: list[BaseException] = field(default_factory=list)

    def failed_open(self, reason: str, exc: BaseException) -> None:
        log.warning("stage %s failed open (%s): %r", self.stage, reason, exc)
        self.observer.stage_failed_open(self.stage, reason)
        self.ctx.events.append(f"{self.stage}:failed-open:{reason}")

    async def as_if_off(self) -> Result:
        """The rest of the chain, with the request the stage received."""
        self.ctx.restore(self.saved)  # type: ignore[arg-type]
        return await self.next_handler(self.ctx)


_FRAME: ContextVar[StageFrame | None] = ContextVar("leangate_stage_frame", default=None)


def current_frame() -> StageFrame | None:
    """The stage running in this task (tasks a stage starts inherit it)."""
    return _FRAME.get()


class Guard:
    """Times a stage, enforces its budget, and makes it fail open."""

    def __init__(
        self,
        stage: Stage,
        next_handler: Handler,
        budget_s: float | None,
        observer: StageObserver,
        tracing: Tracing | None = None,
    ) -> None:
        self.stage = stage
        self.next_handler = next_handler
        self.budget_s = budget_s
        self.observer = observer
        self.tracing = tracing

    async def __call__(self, ctx: RequestContext) -> Result:
        if self.tracing is None:
            return await self._run(ctx)
        with self.tracing.span("leangate.stage", {"leangate.stage": self.stage.name}):
            return await self._run(ctx)

    async def _run(self, ctx: RequestContext) -> Result:
        frame: StageFrame | None = None
        try:
            async with asyncio.timeout(self.budget_s) as deadline:
                frame = StageFrame(
                    self.stage.name,
                    ctx,
                    StageClock(self.budget_s, deadline),
                    self.next_handler,
                    self.observer,
                    ctx.snapshot(),
                )
                token = _FRAME.set(frame)
                try:
                    result = await self.stage(ctx, self._downstream(frame))
                finally:
                    _FRAME.reset(token)
        except Exception as exc:  # TimeoutError included: the budget ran out
            if frame is None:
                raise
            if any(exc is error for error in frame.downstream_errors):
                raise
            return await self._fail_open(frame, exc)
        finally:
            if frame is not None:
                frame.clock.detach()
                own = frame.clock.own_s()
                ctx.timings[self.stage.name] = own
                self.observer.stage_timed(self.stage.name, own)
        return result

    def _downstream(self, frame: StageFrame) -> Handler:
        async def call_next(next_ctx: RequestContext) -> Result:
            own = next_ctx is frame.ctx
            unchanged = own and next_ctx.body is frame.saved[0]
            frame.pending += own
            frame.clock.enter_wait()
            try:
                result = await self.next_handler(next_ctx)
            except Exception as exc:
                if own:
                    frame.downstream_errors.append(exc)
                raise
            finally:
                frame.clock.leave_wait()
                frame.pending -= own
            if own:
                frame.answers.append((result, unchanged))
            elif isinstance(result, StreamResult):
                next_ctx.scope.defer(_closer(result))
            return result

        return call_next

    async def _fail_open(self, frame: StageFrame, exc: Exception) -> Result:
        reason = "timeout" if isinstance(exc, TimeoutError) else "error"
        frame.failed_open(reason, exc)
        if self.tracing is not None:
            self.tracing.note("failed open", {"reason": reason, "error": type(exc).__name__})
        if frame.pending:
            raise exc  # the request's own answer is still being made: nothing to fall back on
        if len(frame.answers) == 1 and frame.answers[0][1]:
            return frame.answers[0][0]
        for answer, _ in frame.answers:
            if isinstance(answer, StreamResult):
                await close_stream(answer)
        return await frame.as_if_off()


def _closer(result: StreamResult) -> Callable[[], Awaitable[None]]:
    return lambda: close_stream(result)


def build_chain(
    stages: Sequence[tuple[Stage, float | None]],
    endpoint: Handler,
    observer: StageObserver | None = None,
    tracing: Tracing | None = None,
) -> Handler:
    """Wrap ``endpoint`` in ``stages`` (first = outermost), each with its budget in seconds
    (``None``: no budget)."""
    handler = endpoint
    for stage, budget_s in reversed(stages):
        handler = Guard(stage, handler, budget_s, observer or NullObserver(), tracing)
    return handler
