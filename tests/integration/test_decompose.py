"""The ``decompose`` stage against the real vLLM server. Plans seeded into the plan cache
fix the shape of the plan where a test needs one (the model's own plans vary)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis
from conftest import (
    MODEL,
    NO_STAGES,
    ProxyThread,
    posted_then_left,
    proxy_settings,
    vllm_running,
    wait_for,
    write_policy,
)

from leangate.bench.common import metric_total
from leangate.cache.intermediate import IntermediateCache
from leangate.middleware.policy import ANONYMOUS, parse_policy
from leangate.planners.decompose import PLAN_HEADER, PLAN_KIND, step_spans

pytestmark = pytest.mark.integration

POLICY = """
rules:
  - name: decompose
    stages:
      - use: decompose
        settings: {mode: always, max_steps: 4, step_tokens: %d}
"""


def _independent() -> list[dict[str, Any]]:
    """Two independent steps and one that uses both. Each call words them anew: sub-answers
    are cached in the shared Redis, and a test that times steps needs them solved."""
    tag = uuid.uuid4().hex[:6]
    return [
        {"question": f"What colour is a ripe banana? ({tag})", "needs": []},
        {"question": f"What colour is a clear sky at noon? ({tag})", "needs": []},
        {"question": "Which of those two colours is warmer?", "needs": [1, 2]},
    ]


def _proxy(
    vllm_url: str, tmp_path: Path, redis_url: str | None, step_tokens: int = 80
) -> ProxyThread:
    policy = write_policy(tmp_path, POLICY % step_tokens)
    return ProxyThread(proxy_settings(vllm_url, policy=policy, redis_url=redis_url))


def _body(question: str, **extra: object) -> dict[str, object]:
    messages = [{"role": "user", "content": question}]
    return {"model": MODEL, "messages": messages, "max_tokens": 60, "temperature": 0, **extra}


def _seed(
    redis_url: str, question: str, plan: list[dict[str, Any]], tenant: str = ANONYMOUS
) -> None:
    key = IntermediateCache.key(tenant, PLAN_KIND, [MODEL, 4, question])
    redis.Redis.from_url(redis_url).set(key, orjson.dumps(plan), px=120_000)


def _question() -> str:
    tag = uuid.uuid4().hex[:8]
    return f"Which is heavier, a blue whale or an elephant, and what does each eat? ({tag})"


def test_plan_solve_synthesize_and_reuse_the_plan(vllm_url: str, tmp_path: Path) -> None:
    # the proxy's own memory store: the plan is the model's, the same on every run
    question = "Which is heavier, a blue whale or an elephant, and what does each eat?"
    with _proxy(vllm_url, tmp_path, None) as proxy:
        url = f"{proxy.url}/v1/chat/completions"
        first = httpx.post(url, json=_body(question), timeout=300)
        again = httpx.post(url, json=_body(question), timeout=300)
    first.raise_for_status()
    plan = first.headers[PLAN_HEADER]
    assert plan.startswith("decompose; reason=policy-always; steps="), plan
    assert "plan=model" in plan and "plan=cache" in again.headers[PLAN_HEADER]
    steps = int(plan.split("steps=")[1].split(";")[0])
    assert f"answers_cached={steps}; calls=1;" in again.headers[PLAN_HEADER], "only synthesis"
    usage = first.json()["usage"]
    assert usage["prompt_tokens"] > (steps + 2) * 20  # the plan, every step, the synthesis
    assert first.json()["choices"][0]["message"]["content"].strip()


def test_independent_steps_overlap_and_dependent_ones_wait(
    vllm_url: str, redis_url: str, tmp_path: Path
) -> None:
    question = _question()
    _seed(redis_url, question, _independent())
    with _proxy(vllm_url, tmp_path, redis_url) as proxy:
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=_body(question), timeout=300)
    response.raise_for_status()
    header = response.headers[PLAN_HEADER]
    assert "plan=cache" in header and "depth=2" in header
    spans = step_spans(header)
    (a1, b1), (a2, b2), (a3, _) = spans[1], spans[2], spans[3]
    assert a1 < b2 and a2 < b1, f"the independent steps ran one after the other: {spans}"
    assert max(b1, b2) - min(a1, a2) <= 1.5 * max(b1 - a1, b2 - a2)
    assert a3 >= max(b1, b2), f"step 3 started before its inputs were answered: {spans}"


BAD_PLANS = {
    "a cycle": [
        {"question": "Which comes first?", "needs": [2]},
        {"question": "Which comes second?", "needs": [1]},
    ],
    "a missing reference": [*_independent()[:2], {"question": "And the third?", "needs": [7]}],
    "too many steps": [{"question": f"What is {n} plus {n}?", "needs": []} for n in range(9)],
}


@pytest.mark.parametrize("why", sorted(BAD_PLANS))
def test_a_bad_stored_plan_answers_directly(
    why: str, vllm_url: str, redis_url: str, tmp_path: Path
) -> None:
    question = _question()
    _seed(redis_url, question, BAD_PLANS[why])
    with _proxy(vllm_url, tmp_path, redis_url) as proxy:
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=_body(question), timeout=300)
        failed = metric_total(proxy.url, "leangate_stage_failed_open_total")
    response.raise_for_status()
    assert PLAN_HEADER not in response.headers and failed == 1
    direct = httpx.post(f"{vllm_url}/v1/chat/completions", json=_body(question), timeout=300)
    content = response.json()["choices"][0]["message"]["content"]
    assert content == direct.json()["choices"][0]["message"]["content"]


def test_a_step_asked_before_is_not_solved_again(
    vllm_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Sub-answers are kept per step request and attached documents: a second plan that
    shares a step takes its answer from the intermediate cache; the same plan with other
    documents solves every step again."""
    first, second, third = _question(), _question(), _question()
    banana, sky = _independent()[:2]
    grass = {"question": f"What colour is fresh grass? ({uuid.uuid4().hex[:6]})", "needs": []}
    _seed(redis_url, first, [banana, sky])
    _seed(redis_url, second, [banana, grass])
    _seed(redis_url, third, [banana, grass])
    documents = {"leangate": {"documents": [{"id": "d", "text": "Bananas here are blue."}]}}
    with _proxy(vllm_url, tmp_path, redis_url, step_tokens=16) as proxy:
        url = f"{proxy.url}/v1/chat/completions"
        bodies = [_body(first), _body(second), _body(third, **documents)]
        headers = [httpx.post(url, json=b, timeout=300).headers[PLAN_HEADER] for b in bodies]
    assert "answers_cached=0; calls=3;" in headers[0], headers[0]
    assert "answers_cached=1; calls=2;" in headers[1], headers[1]
    assert "answers_cached=0; calls=3;" in headers[2], "other documents, other answers"


def test_the_synthesis_streams_to_the_openai_client(
    vllm_url: str, redis_url: str, tmp_path: Path
) -> None:
    question = _question()
    # an API key no policy lists is a tenant of its own: the plan is seeded for it
    _seed(redis_url, question, _independent(), parse_policy(NO_STAGES).tenant_for_key("k") or "")
    with _proxy(vllm_url, tmp_path, redis_url) as proxy:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=60,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert "plan=cache" in raw.headers[PLAN_HEADER]
        chunks = list(raw.parse())
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3 and "".join(pieces).strip()
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 4 * 20  # three steps and the synthesis


def test_a_client_that_leaves_stops_every_step(
    vllm_url: str, redis_url: str, tmp_path: Path
) -> None:
    question, tag = _question(), uuid.uuid4().hex[:6]
    long = [
        {"question": f"List {n} hundred animal names, one per line ({tag}).", "needs": []}
        for n in (1, 2)
    ]
    _seed(redis_url, question, long)
    with _proxy(vllm_url, tmp_path, redis_url, step_tokens=1000) as proxy:
        with posted_then_left(f"{proxy.url}/v1/chat/completions", _body(question)):
            wait_for(lambda: vllm_running(vllm_url) >= 2, 120, "the two steps never ran together")
        wait_for(lambda: vllm_running(vllm_url) == 0, 10, "steps run on for a gone client")
