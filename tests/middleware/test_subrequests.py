"""Sub-requests and joined streams, against a scripted backend (failure paths); the real
vLLM is driven in tests/integration/test_fanout.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.errors import BackendProtocolError
from leangate.backend.transport import HttpxTransport
from leangate.middleware.context import JsonResult, RequestContext, Result, StreamResult
from leangate.middleware.endpoint import forward
from leangate.middleware.metrics import Metrics
from leangate.middleware.pipeline import Handler, build_chain
from leangate.middleware.subrequests import Part

MODELS = {"object": "list", "data": [{"id": "m", "object": "model"}]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


class Backend:
    """A scripted OpenAI server: the last user message says how to answer."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.closed: list[str] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        body = json.loads(request.content)
        self.bodies.append(body)
        say = body["messages"][-1]["content"]
        if say == "fail":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if say.startswith("slow"):
            await asyncio.sleep(float(say.split()[1]))
        if not body.get("stream"):
            message = {"role": "assistant", "content": say}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return httpx.Response(200, json={"choices": [choice], "usage": USAGE})
        return httpx.Response(200, stream=_Events(self, say))


class _Events(httpx.AsyncByteStream):
    def __init__(self, backend: Backend, say: str) -> None:
        self.backend = backend
        self.say = say

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for word in self.say.split():
            if word == "hang":
                await asyncio.sleep(30)
            if word == "cut":
                return
            chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            await asyncio.sleep(0.01)
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield b"data: " + orjson.dumps(done) + b"\n\n"
        yield b"data: " + orjson.dumps({"choices": [], "usage": USAGE}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.backend.closed.append(self.say)


async def _client(backend: Backend) -> BackendClient:
    client = BackendClient(BackendSettings(urls=["http://a"]), HttpxTransport(backend.transport()))
    await client.check_health()
    return client


def _ctx(client: BackendClient, say: str = "direct answer", stream: bool = False) -> RequestContext:
    body = {"model": "m", "messages": [{"role": "user", "content": say}], "stream": stream}
    return RequestContext.validated("chat", body, tenant="acme", backend=client)


def _ask(say: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": say}]}


class FanOut:
    """Asks every question at once; streamed, joins the answers in order."""

    name = "fanout"

    def __init__(self, questions: list[str], *, budget_s: float | None = None) -> None:
        self.questions = questions
        self.budget_s = budget_s
        self.seen: list[RequestContext] = []

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        sub = ctx.subrequests
        if ctx.stream:
            parts = [sub.stream(_ask(q), budget_s=self.budget_s) for q in self.questions]
            return sub.join([Part(p, before="\n" if i else "") for i, p in enumerate(parts)])
        answers = await sub.gather([_ask(q) for q in self.questions])
        texts = [a["choices"][0]["message"]["content"] for a in answers]
        return JsonResult(" | ".join(texts).encode())


async def _texts(result: Result) -> list[str]:
    assert isinstance(result, StreamResult)
    pieces = []
    async for payload in result.events:
        chunk = orjson.loads(payload)
        for choice in chunk.get("choices") or []:
            pieces.append((choice.get("delta") or {}).get("content") or "")
    return pieces


async def test_sub_requests_carry_the_request_and_are_not_charged_to_the_budget() -> None:
    backend = Backend()
    client = await _client(backend)
    metrics = Metrics()
    stage = FanOut(["slow 0.2", "slow 0.3"])
    ctx = _ctx(client)
    result = await build_chain([(stage, 0.05)], forward, metrics)(ctx)
    assert isinstance(result, JsonResult) and result.body == b"slow 0.2 | slow 0.3"
    assert ctx.events == [], "the 0.3 s of sub-requests did not count against 50 ms"
    assert [b["model"] for b in backend.bodies] == ["m", "m"]
    assert all(b["stream"] is False for b in backend.bodies)
    assert ctx.scope.usage.as_dict() == {
        "prompt_tokens": 6,
        "completion_tokens": 4,
        "total_tokens": 10,
    }
    assert metrics.subrequests.labels("fanout", "plain", "ok")._value.get() == 2
    derived = ctx.derive(_ask("x"))
    assert (derived.tenant, derived.model, derived.scope) == ("acme", "m", ctx.scope)
    assert derived.affinity_key(64) == ctx.affinity_key(64)
    await client.aclose()


async def test_a_failed_sub_request_fails_the_stage_open() -> None:
    backend = Backend()
    client = await _client(backend)
    metrics = Metrics()
    result = await build_chain([(FanOut(["fine", "fail"]), 1.0)], forward, metrics)(_ctx(client))
    assert isinstance(result, JsonResult)
    assert orjson.loads(result.body)["choices"][0]["message"]["content"] == "direct answer"
    assert metrics.failed_open.labels("fanout", "error")._value.get() == 1
    await client.aclose()


async def test_joined_stream_flows_in_part_order_with_summed_usage() -> None:
    backend = Backend()
    client = await _client(backend)
    ctx = _ctx(client, stream=True)
    ctx.replace_body({**ctx.body, "stream_options": {"include_usage": True}})
    stage = FanOut(["slow 0.2 one two", "three four"])
    result = await build_chain([(stage, 1.0)], forward)(ctx)
    assert isinstance(result, StreamResult)
    payloads = [orjson.loads(p) async for p in result.events]
    text = "".join(
        (c.get("delta") or {}).get("content") or "" for p in payloads for c in p["choices"]
    )
    assert text == "slow 0.2 one two \nthree four "
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({p["id"] for p in payloads}) == 1
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
    assert payloads[-1]["usage"]["total_tokens"] == 10
    assert all(b["stream_options"] == {"include_usage": True} for b in backend.bodies)
    await client.aclose()


async def test_joined_stream_fails_open_before_its_first_byte() -> None:
    backend = Backend()
    client = await _client(backend)
    metrics = Metrics()
    ctx = _ctx(client, say="the direct way", stream=True)
    result = await build_chain([(FanOut(["fail", "fine"]), 1.0)], forward, metrics)(ctx)
    assert "".join(await _texts(result)) == "the direct way "
    assert metrics.failed_open.labels("fanout", "error")._value.get() == 1
    await client.aclose()


async def test_a_part_over_its_budget_fails_open_before_the_first_byte() -> None:
    backend = Backend()
    client = await _client(backend)
    metrics = Metrics()
    ctx = _ctx(client, say="the direct way", stream=True)
    stage = FanOut(["hang", "fine"], budget_s=0.2)
    result = await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    assert "".join(await _texts(result)) == "the direct way "
    assert metrics.failed_open.labels("fanout", "timeout")._value.get() == 1
    await client.aclose()


async def test_joined_stream_ends_with_an_error_after_its_first_byte() -> None:
    backend = Backend()
    client = await _client(backend)
    ctx = _ctx(client, stream=True)
    result = await build_chain([(FanOut(["one two", "three cut"]), 1.0)], forward)(ctx)
    assert isinstance(result, StreamResult)
    seen = []
    with pytest.raises(BackendProtocolError):
        async for payload in result.events:
            seen.append(payload)
    assert seen, "the first part was sent before the second failed"
    await client.aclose()


async def test_closing_the_request_stops_sub_streams_nobody_read() -> None:
    backend = Backend()
    client = await _client(backend)
    ctx = _ctx(client, stream=True)
    stage = FanOut(["a hang", "b hang"])
    result = await build_chain([(stage, 1.0)], forward)(ctx)
    assert isinstance(result, StreamResult)
    await asyncio.sleep(0.1)  # both sub-requests are running; the stream is never read
    await asyncio.wait_for(ctx.scope.aclose(), 2)
    assert sorted(backend.closed) == ["a hang", "b hang"]
    assert client.outstanding("m") == 0
    await client.aclose()


async def test_deferred_cleanups_run_once_when_the_request_ends() -> None:
    backend = Backend()
    client = await _client(backend)
    ctx = _ctx(client)
    ran: list[str] = []

    async def async_cleanup() -> None:
        ran.append("async")

    ctx.scope.defer(lambda: ran.append("sync"))
    ctx.scope.defer(async_cleanup)
    await ctx.scope.aclose()
    await ctx.scope.aclose()
    assert ran == ["async", "sync"]
    await client.aclose()


async def test_through_chain_sub_requests_meet_the_later_stages() -> None:
    backend = Backend()
    client = await _client(backend)
    seen: list[tuple[str, str]] = []

    class Later:
        name = "later"

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            seen.append((ctx.tenant, ctx.body["messages"][-1]["content"]))
            return await call_next(ctx)

    class Asks:
        name = "asks"

        async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
            sub = ctx.subrequests
            await sub.complete(_ask("through"), through_chain=True)
            await sub.complete(_ask("around"))
            return await call_next(ctx)

    await build_chain([(Asks(), 1.0), (Later(), 1.0)], forward)(_ctx(client))
    assert seen == [("acme", "through"), ("acme", "direct answer")]
    assert [b["messages"][-1]["content"] for b in backend.bodies] == [
        "through",
        "around",
        "direct answer",
    ]
    await client.aclose()


class Progressive:
    """Starts its parts one by one from an async generator, as a planner does when the
    parts' inputs arrive over time; "raise" makes the generator fail."""

    name = "progressive"

    def __init__(self, questions: list[str]) -> None:
        self.questions = questions

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        sub = ctx.subrequests

        async def parts() -> AsyncIterator[Part]:
            for i, question in enumerate(self.questions):
                if question == "raise":
                    raise ValueError("no more parts")
                yield Part(sub.stream(_ask(question)), before="\n" if i else "")
                await asyncio.sleep(0.05)

        return sub.join(parts())


async def test_parts_from_a_generator_start_before_earlier_parts_are_read() -> None:
    backend = Backend()
    client = await _client(backend)
    ctx = _ctx(client, stream=True)
    result = await build_chain([(Progressive(["slow 0.5 one", "two", "three"]), 1.0)], forward)(ctx)
    assert isinstance(result, StreamResult)
    events = aiter(result.events)
    first = orjson.loads(await anext(events))
    assert first["choices"][0]["delta"]["content"] == "slow "
    assert len(backend.bodies) == 3, "later parts started while part 1 was still waiting"
    rest = [orjson.loads(p) async for p in events]
    text = "".join((c.get("delta") or {}).get("content") or "" for p in rest for c in p["choices"])
    assert text == "0.5 one \ntwo \nthree "
    await client.aclose()


async def test_a_generator_failing_before_the_first_byte_fails_open() -> None:
    backend = Backend()
    client = await _client(backend)
    metrics = Metrics()
    ctx = _ctx(client, say="the direct way", stream=True)
    result = await build_chain([(Progressive(["raise"]), 1.0)], forward, metrics)(ctx)
    assert "".join(await _texts(result)) == "the direct way "
    assert metrics.failed_open.labels("progressive", "error")._value.get() == 1
    await client.aclose()
