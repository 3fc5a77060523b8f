"""The stage pipeline: each stage wraps the rest of the chain, and the chain is built once.

A stage is ``async (ctx, call_next) -> Result``. It may change the request before calling
``call_next``, answer without calling it (a cache hit), call it and change the result, or
call the backend itself, several times at once. ``build_chain`` wraps every stage in a
``Guard`` that times it and makes it fail open:

- an exception or a time-budget overrun *before* the stage called ``call_next`` undoes its
  change to the request and continues with the rest of the chain, as if the stage were off;
- the same *after* ``call_next`` returned gives back what ``call_next`` returned;
- an error raised *by* ``call_next`` (the backend's) passes through untouched.

The budget counts only the stage's own time: the clock stops while ``call_next`` runs,
and while the stage waits inside ``async with ctx.pause_budget():`` (for another request's
answer, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from leangate.middleware.context import RequestContext, Result

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


class _DownstreamError(Exception):
    """Carries an exception raised by ``call_next`` through the stage untouched."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


@dataclass
class _Run:
    """Bookkeeping for one pass of a request through one guarded stage."""

    downstream_s: float = 0.0
    result: Result | None = None
    called: bool = False


Pauser = Callable[[], contextlib.AbstractAsyncContextManager[None]]


def _pauser(deadline: asyncio.Timeout, run: _Run) -> Pauser:
    """A context manager factory that stops the stage's clock while its body runs."""

    @contextlib.asynccontextmanager
    async def pause() -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        when = deadline.when()
        remaining = None if when is None else when - loop.time()
        deadline.reschedule(None)
        entered = time.perf_counter()
        try:
            yield
        finally:
            run.downstream_s += time.perf_counter() - entered
            if remaining is not None:
                deadline.reschedule(loop.time() + max(remaining, 0.0))

    return pause


class Guard:
    """Times a stage, enforces its budget, and makes it fail open."""

    def __init__(
        self,
        stage: Stage,
        next_handler: Handler,
        budget_s: float | None,
        observer: StageObserver,
    ) -> None:
        self.stage = stage
        self.next_handler = next_handler
        self.budget_s = budget_s
        self.observer = observer

    async def __call__(self, ctx: RequestContext) -> Result:
        run = _Run()
        body, raw, outer_pause = ctx.body, ctx.raw, ctx.pause_budget
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.budget_s) as deadline:
                pause = _pauser(deadline, run)
                ctx.pause_budget = pause
                result = await self.stage(ctx, self._downstream(run, pause))
        except _DownstreamError as exc:
            raise exc.error from None
        except (Exception, TimeoutError) as exc:
            return await self._fail_open(ctx, run, body, raw, exc)
        finally:
            ctx.pause_budget = outer_pause
            own = time.perf_counter() - started - run.downstream_s
            ctx.timings[self.stage.name] = own
            self.observer.stage_timed(self.stage.name, own)
        return result

    def _downstream(self, run: _Run, pause: Pauser) -> Handler:
        async def call_next(next_ctx: RequestContext) -> Result:
            run.called = True
            try:
                async with pause():
                    run.result = await self.next_handler(next_ctx)
            except Exception as exc:
                raise _DownstreamError(exc) from exc
            finally:
                next_ctx.pause_budget = pause
            return run.result

        return call_next

    async def _fail_open(
        self,
        ctx: RequestContext,
        run: _Run,
        body: dict[str, object],
        raw: bytes | None,
        exc: BaseException,
    ) -> Result:
        reason = "timeout" if isinstance(exc, TimeoutError) else "error"
        log.warning("stage %s failed open (%s): %r", self.stage.name, reason, exc)
        self.observer.stage_failed_open(self.stage.name, reason)
        ctx.events.append(f"{self.stage.name}:failed-open:{reason}")
        if run.result is not None:
            return run.result
        if run.called:
            raise exc  # call_next is running or failed in a way we cannot recover from
        ctx.body, ctx.raw = body, raw
        return await self.next_handler(ctx)


def build_chain(
    stages: Sequence[tuple[Stage, float | None]],
    endpoint: Handler,
    observer: StageObserver | None = None,
) -> Handler:
    """Wrap ``endpoint`` in ``stages`` (first = outermost), each with its budget in seconds
    (``None``: no budget)."""
    handler = endpoint
    for stage, budget_s in reversed(stages):
        handler = Guard(stage, handler, budget_s, observer or NullObserver())
    return handler
