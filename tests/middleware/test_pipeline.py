"""The guard around each stage: timing, budgets, and failing open."""

from __future__ import annotations

import asyncio

import pytest

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.errors import BackendTimeout
from leangate.middleware.context import JsonResult, RequestContext, Result
from leangate.middleware.pipeline import Handler, build_chain
from leangate.middleware.protocol import ChatCompletionRequest

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
    return RequestContext(
        route="chat",
        body=dict(BODY),
        raw=b"{}",
        request=ChatCompletionRequest.model_validate(BODY),
        tenant="t",
        backend=BackendClient(BackendSettings()),
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
        ("raise-after", b"rewritten", "error"),
        ("slow-after", b"rewritten", "timeout"),
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
