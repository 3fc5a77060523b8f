"""Pure parts of the cache: answer replay, keys and scopes, single-flight, the breaker."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from leangate.backend.client import BackendClient, BackendSettings
from leangate.cache.keys import answer_key, exact_hash, scope_prefix, semantic_parts
from leangate.cache.replay import assemble, is_complete, to_events
from leangate.cache.services import Breaker, StoreUnavailable
from leangate.cache.singleflight import SingleFlight
from leangate.cache.store import MemoryStore, StoreError
from leangate.middleware.context import RequestContext

WHOLE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "x" * 150},
            "logprobs": None,
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
}


def test_whole_answer_round_trips_through_a_stream() -> None:
    events = to_events("chat", WHOLE, include_usage=True)
    assert len(events) > 3, "replayed in several pieces"
    assert orjson.loads(events[-1])["usage"] == WHOLE["usage"]
    again = assemble("chat", events)
    assert again is not None and is_complete(again)
    assert again["choices"] == WHOLE["choices"]
    assert "usage" not in orjson.loads(to_events("chat", WHOLE, include_usage=False)[-1])


def test_completions_round_trip() -> None:
    whole = {
        "id": "c",
        "model": "m",
        "choices": [{"index": 0, "text": "Paris.", "finish_reason": "stop"}],
    }
    again = assemble("completions", to_events("completions", whole, include_usage=False))
    assert again is not None and again["choices"][0]["text"] == "Paris."


@pytest.mark.parametrize(
    "chunks",
    [
        [{"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}],
        [{"error": {"message": "boom"}}],
        [{"choices": [{"index": 0, "delta": {"tool_calls": [{}]}, "finish_reason": "tool_calls"}]}],
        [
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": "a"},
                        "logprobs": {"content": []},
                        "finish_reason": "stop",
                    }
                ]
            }
        ],
    ],
)
def test_streams_that_cannot_be_stored(chunks: list[dict[str, Any]]) -> None:
    assert assemble("chat", [orjson.dumps(c) for c in chunks]) is None


def _ctx(body: dict[str, Any], tenant: str = "t") -> RequestContext:
    return RequestContext.validated(
        "chat", body, tenant=tenant, backend=BackendClient(BackendSettings())
    )


def _body(*turns: str, **fields: Any) -> dict[str, Any]:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"model": "m", "messages": messages, "temperature": 0, **fields}


def test_exact_key_ignores_stream_flags_but_not_sampling() -> None:
    base = exact_hash(_ctx(_body("hi")))
    assert (
        exact_hash(_ctx(_body("hi", stream=True, stream_options={"include_usage": True}))) == base
    )
    assert exact_hash(_ctx(_body("hi", max_tokens=5))) != base
    assert exact_hash(_ctx(_body("hi", temperature=0.0, seed=1))) != base
    assert exact_hash(_ctx(_body("hi "))) != base


def test_keys_are_scoped_by_tenant_and_namespace() -> None:
    ctx_a, ctx_b = _ctx(_body("hi"), "a"), _ctx(_body("hi"), "b")
    h = exact_hash(ctx_a)
    assert answer_key(ctx_a, "ns", h) != answer_key(ctx_b, "ns", h)
    assert answer_key(ctx_a, "ns", h) != answer_key(ctx_a, "other", h)
    assert answer_key(ctx_a, "ns", h).startswith(scope_prefix("a", "ns"))
    assert scope_prefix("a", None).endswith(":*:")


def test_semantic_scope_covers_earlier_turns() -> None:
    single = semantic_parts(_ctx(_body("What is 2+2?")), "ns")
    follow = semantic_parts(_ctx(_body("Talk maths.", "OK.", "What is 2+2?")), "ns")
    other_tenant = semantic_parts(_ctx(_body("What is 2+2?"), "x"), "ns")
    assert single and follow and other_tenant
    assert single[1] == follow[1] == "What is 2+2?"
    assert len({single[0], follow[0], other_tenant[0]}) == 3
    assert semantic_parts(_ctx(_body("hi", "there")), "ns") is None, "last turn is not the user's"


async def test_singleflight_hands_the_answer_to_followers() -> None:
    singleflight = SingleFlight()
    flight, leader = singleflight.join("k")
    assert leader
    followers = [singleflight.join("k") for _ in range(3)]
    assert all(f is flight and not leads for f, leads in followers)
    waiting = asyncio.ensure_future(flight.changed(1.0))
    await asyncio.sleep(0)
    flight.push(b"event")
    assert await waiting and flight.events == [b"event"]
    singleflight.finish(flight, b"answer")
    assert flight.done and flight.answer == b"answer" and not flight.failed
    assert len(singleflight) == 0
    newer, leader = singleflight.join("k")
    assert leader and newer is not flight
    singleflight.finish(flight, None)  # a late, repeated finish of the old flight
    assert flight.answer == b"answer", "finishing is idempotent"
    assert singleflight.join("k") == (newer, False), "and leaves the newer flight alone"


async def test_breaker_pauses_after_a_failure() -> None:
    breaker = Breaker(pause_s=0.05)

    async def failing() -> None:
        raise StoreError("down")

    async def working() -> int:
        return 1

    with pytest.raises(StoreError):
        await breaker.call(failing())
    with pytest.raises(StoreUnavailable):
        await breaker.call(working())
    await asyncio.sleep(0.06)
    assert await breaker.call(working()) == 1


async def test_memory_store_ttl_scan_index_and_events() -> None:
    store = MemoryStore()
    await store.set("lg:a:1", b"v", ttl_s=0.05)
    await store.set("lg:b:1", b"w", ttl_s=10)
    assert [k async for k in store.scan("lg:a:*")] == ["lg:a:1"]
    await asyncio.sleep(0.06)
    assert await store.get("lg:a:1") is None
    assert await store.index_add("ix", "x", 1.0) == 1
    assert await store.index_add("ix", "y", 2.0) == 2
    assert await store.index_pop_oldest("ix", 1) == ["x"]
    last = await store.last_event_id("ev")
    waiter = asyncio.create_task(store.read_events("ev", last, block_ms=1000))
    await asyncio.sleep(0.01)
    await store.publish("ev", "add", "k1")
    events = await waiter
    assert [(e.op, e.key) for e in events] == [("add", "k1")]
