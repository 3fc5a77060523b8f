"""The guard around each stage: timing, budgets, and failing open."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.errors import BackendError, BackendTimeout
from leangate.middleware.context import JsonResult, RequestContext, Result
from leangate.middleware.pipeline import Handler, StageClock, build_chain

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Recorder:
    def __init__(self) -> None:
        self.failed: list[tuple[str, str]] = []
        self.timed: dict[str, float] = {}

    def stage_timed(self, stage: str, seconds: float) -> None:
        self.timed[stage] = seconds

    def stage_failed_open(self, stage: str, reason: str) -> None:
        self.failed.append((stage, reason))


def make_ctx() -> RequestContext:
    return RequestContext.validated(
        "chat", dict(BODY), tenant="t", backend=BackendClient(BackendSettings()), raw=b"{}"
    )


async def endpoint(ctx: RequestContext) -> Result:
    return JsonResult(str(ctx.body.get("marker", "none")).encode())


class Rewrites:
    """Replaces the body, then misbehaves as told."""

    name = "rewrites"

    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        ctx.replace_body({**ctx.body, "marker": "rewritten"})
        if self.mode == "raise-before":
            raise RuntimeError("boom")
        if self.mode == "slow-before":
            await asyncio.sleep(1)
        result = await call_next(ctx)
        if self.mode == "raise-after":
            raise RuntimeError("boom after")
        if self.mode == "slow-after":
            await asyncio.sleep(1)
        assert isinstance(result, JsonResult)
        return JsonResult(result.body + b"+post")


@pytest.mark.parametrize(
    ("mode", "body", "failure"),
    [
        ("ok", b"rewritten+post", None),
        ("raise-before", b"none", "error"),
        ("slow-before", b"none", "timeout"),
        ("raise-after", b"none", "error"),
        ("slow-after", b"none", "timeout"),
    ],
)
async def test_stage_fails_open(mode: str, body: bytes, failure: str | None) -> None:
    recorder = Recorder()
    chain = build_chain([(Rewrites(mode), 0.05)], endpoint, recorder)
    ctx = make_ctx()
    result = await chain(ctx)
    assert isinstance(result, JsonResult)
    assert result.body == body
    assert recorder.failed == ([("rewrites", failure)] if failure else [])
    assert "rewrites" in recorder.timed
    if mode == "raise-before":
        assert ctx.raw == b"{}", "the failed stage's change to the request was undone"


async def test_budget_excludes_the_rest_of_the_chain() -> None:
    async def slow_endpoint(ctx: RequestContext) -> Result:
        await asyncio.sleep(0.2)
        return JsonResult(b"done")

    recorder = Recorder()
    chain = build_chain([(Rewrites("ok"), 0.05)], slow_endpoint, recorder)
    result = await chain(make_ctx())
    assert isinstance(result, JsonResult) and result.body == b"done+post"
    assert recorder.failed == []
    assert recorder.timed["rewrites"] < 0.05


async def test_backend_errors_pass_through_the_guard() -> None:
    async def failing(ctx: RequestContext) -> Result:
        raise BackendTimeout("slow backend")

    recorder = Recorder()
    chain = build_chain([(Rewrites("ok"), 0.05)], failing, recorder)
    with pytest.raises(BackendTimeout):
        await chain(make_ctx())
    assert recorder.failed == []


async def test_stages_nest_in_order() -> None:
    seen: list[str] = []

    class Tag:
        def __init__(self, name: str) -> None:
            self.name = name

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            seen.append(self.name)
            return await call_next(ctx)

    chain = build_chain([(Tag("a"), None), (Tag("b"), None)], endpoint)
    await chain(make_ctx())
    assert seen == ["a", "b"]


async def _sleep_waiting(ctx: RequestContext, seconds: float) -> None:
    async with ctx.pause_budget():
        await asyncio.sleep(seconds)


async def test_overlapping_waits_neither_restart_the_clock_nor_add_up() -> None:
    """Two overlapping waits (0.1 s and 0.3 s): the budget is off until the last ends, and
    the own time is wall time minus their union, not minus their sum."""

    class Overlaps:
        name = "overlaps"

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            await asyncio.gather(_sleep_waiting(ctx, 0.1), _sleep_waiting(ctx, 0.3))
            return await call_next(ctx)

    recorder = Recorder()
    chain = build_chain([(Overlaps(), 0.05)], endpoint, recorder)
    result = await chain(make_ctx())
    assert isinstance(result, JsonResult) and result.body == b"none"
    assert recorder.failed == [], "the first wait to end must not restart the clock"
    assert 0 <= recorder.timed["overlaps"] < 0.05


async def test_own_time_between_waits_counts_against_the_budget() -> None:
    class Busy:
        name = "busy"

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            await _sleep_waiting(ctx, 0.05)
            await asyncio.sleep(0.2)  # the stage's own (non-waiting) time
            return await call_next(ctx)

    recorder = Recorder()
    result = await build_chain([(Busy(), 0.1)], endpoint, recorder)(make_ctx())
    assert isinstance(result, JsonResult) and result.body == b"none"
    assert recorder.failed == [("busy", "timeout")]


@pytest.mark.parametrize("how", ["rewrite", "derive"])
async def test_failing_after_a_sub_answer_never_sends_it(how: str) -> None:
    """A stage that asked the rest of the chain for a skeleton and then failed: the client
    gets the answer to its own request, not the skeleton."""

    class Planner:
        name = "planner"

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            body = {**ctx.body, "marker": "skeleton"}
            if how == "rewrite":
                ctx.replace_body(body)
                skeleton = await call_next(ctx)
            else:
                skeleton = await call_next(ctx.derive(body))
            assert isinstance(skeleton, JsonResult) and skeleton.body == b"skeleton"
            raise RuntimeError("could not parse the skeleton")

    recorder = Recorder()
    result = await build_chain([(Planner(), 1.0)], endpoint, recorder)(make_ctx())
    assert isinstance(result, JsonResult) and result.body == b"none"
    assert recorder.failed == [("planner", "error")]


async def test_a_stage_that_only_wrapped_the_answer_keeps_it_when_it_fails() -> None:
    calls: list[str] = []

    async def counted(ctx: RequestContext) -> Result:
        calls.append("backend")
        return JsonResult(b"answer")

    class Wraps:
        name = "wraps"

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            await call_next(ctx)
            raise RuntimeError("could not store it")

    result = await build_chain([(Wraps(), 1.0)], counted, Recorder())(make_ctx())
    assert isinstance(result, JsonResult) and result.body == b"answer"
    assert calls == ["backend"], "the answer was not paid for twice"


async def test_stages_can_catch_the_backend_errors_of_call_next() -> None:
    async def failing(ctx: RequestContext) -> Result:
        raise BackendTimeout("slow backend")

    class Catches:
        name = "catches"

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            try:
                return await call_next(ctx)
            except BackendError as exc:
                return JsonResult(f"caught {type(exc).__name__}".encode())

    result = await build_chain([(Catches(), 1.0)], failing, Recorder())(make_ctx())
    assert isinstance(result, JsonResult) and result.body == b"caught BackendTimeout"


async def test_a_rewritten_model_is_the_one_forwarded() -> None:
    seen: list[tuple[str, str]] = []

    async def records(ctx: RequestContext) -> Result:
        seen.append((ctx.model, ctx.body["model"]))
        return JsonResult(b"{}")

    class Reroutes:
        name = "reroutes"

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            ctx.replace_body({**ctx.body, "model": "other"})
            return await call_next(ctx)

    await build_chain([(Reroutes(), 1.0)], records, Recorder())(make_ctx())
    assert seen == [("other", "other")]


async def test_an_invalid_rewrite_fails_the_stage_open() -> None:
    class Breaks:
        name = "breaks"

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            ctx.replace_body({"model": "m", "messages": []})
            return await call_next(ctx)

    recorder = Recorder()
    result = await build_chain([(Breaks(), 1.0)], endpoint, recorder)(make_ctx())
    assert isinstance(result, JsonResult) and result.body == b"none"
    assert recorder.failed == [("breaks", "error")]


async def test_waits_leave_a_deadline_that_already_fired_alone() -> None:
    """Another task's wait may end between the deadline firing and the stage being
    cancelled; moving an expiring timeout raises (a 500, before)."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01) as deadline:
            clock = StageClock(0.01, deadline)
            clock.enter_wait()
            deadline.reschedule(asyncio.get_running_loop().time())  # fires at once
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1)  # the timeout expires and cancels this sleep
            assert deadline.expired()
            clock.leave_wait()  # must not raise
            clock.enter_wait()
            clock.leave_wait()
            raise asyncio.CancelledError  # what the stage would have seen
