"""The result cache in front of the real vLLM server, on the real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from conftest import (
    MODEL,
    ProxyThread,
    backend_requests,
    free_port,
    proxy_settings,
    start_redis,
    too_long_prompt,
    write_policy,
)

pytestmark = pytest.mark.integration

POLICY = """
tenants:
  alpha: {api_keys: [sk-alpha]}
  beta: {api_keys: [sk-beta]}
rules:
  - name: cached
    stages:
      - use: cache
        budget_ms: %d
        settings: {namespace: "%s", ttl_s: 600, semantic: %s}
"""


def _policy(*, semantic: bool) -> str:
    budget = 2000 if semantic else 300
    return POLICY % (budget, _unique(), str(semantic).lower())


def _unique() -> str:
    return uuid.uuid4().hex[:8]


def _chat(question: str, **extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 12,
        "temperature": 0,
        **extra,
    }


def _post(
    proxy: ProxyThread, body: dict[str, object], key: str = "sk-alpha", **headers: str
) -> httpx.Response:
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module", params=["redis", "memory"])
def cached(
    request: pytest.FixtureRequest,
    vllm_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyThread]:
    """The same cache on the real Redis and on the embedded in-process store."""
    policy = write_policy(tmp_path_factory.mktemp("exact"), _policy(semantic=False))
    store_url = redis_url if request.param == "redis" else None
    settings = proxy_settings(vllm_url, policy=policy, redis_url=store_url, admin_api_key="admin")
    with ProxyThread(settings) as running:
        yield running


def test_exact_hit_after_miss(cached: ProxyThread) -> None:
    body = _chat(f"Say hello to {_unique()}.")
    first = _post(cached, body)
    second = _post(cached, body)
    assert first.headers["x-leangate-cache"] == "miss"
    assert second.headers["x-leangate-cache"] == "hit-exact"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.headers["server-timing"].startswith("cache;dur=")


def _saved_seconds(proxy: ProxyThread) -> float:
    text = httpx.get(proxy.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith('leangate_stage_saved_seconds_total{stage="cache"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_hit_counts_the_backend_time_it_saved(cached: ProxyThread) -> None:
    body = _chat(f"Say goodbye to {_unique()}.")
    _post(cached, body)
    before = _saved_seconds(cached)
    assert _post(cached, body).headers["x-leangate-cache"] == "hit-exact"
    assert _saved_seconds(cached) > before


def test_non_deterministic_requests_bypass(cached: ProxyThread) -> None:
    body = _chat(f"Tell me about {_unique()}.", temperature=0.7)
    assert _post(cached, body).headers["x-leangate-cache"] == "bypass"
    n2 = _chat(f"Tell me about {_unique()}.", n=2, seed=1, temperature=0.5)
    assert _post(cached, n2).headers["x-leangate-cache"] == "bypass"


def test_streamed_replay_is_valid_sse(cached: ProxyThread) -> None:
    question = f"Name a fruit. Ref {_unique()}."
    plain = _post(cached, _chat(question)).json()["choices"][0]["message"]["content"]
    client = openai.OpenAI(base_url=cached.url + "/v1", api_key="sk-alpha", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-leangate-cache"] == "hit-exact"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert chunks[-1].usage is not None
    # Byte level: every event is `data: <json>` and the stream ends with [DONE].
    text = httpx.post(
        cached.url + "/v1/chat/completions",
        json=_chat(question, stream=True),
        headers={"authorization": "Bearer sk-alpha"},
    ).text
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        assert event.startswith("data: {") and event.endswith("}")


def test_completed_stream_is_stored_and_interrupted_stream_is_not(cached: ProxyThread) -> None:
    client = openai.OpenAI(base_url=cached.url + "/v1", api_key="sk-alpha", max_retries=0)
    finished = f"Describe the sea. Ref {_unique()}."
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": finished}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        if c.choices
    )
    time.sleep(0.2)
    again = _post(cached, _chat(finished))
    assert again.headers["x-leangate-cache"] == "hit-exact"
    assert again.json()["choices"][0]["message"]["content"] == streamed

    cut = _chat(
        f"Write a long story. Ref {_unique()}.", stream=True, max_tokens=300, ignore_eos=True
    )
    with httpx.stream(
        "POST",
        cached.url + "/v1/chat/completions",
        json=cut,
        headers={"authorization": "Bearer sk-alpha"},
    ) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    time.sleep(0.5)
    cut["stream"] = False
    assert _post(cached, cut).headers["x-leangate-cache"] == "miss"


def test_tenants_never_share_entries(cached: ProxyThread) -> None:
    body = _chat(f"What is a tenant? Ref {_unique()}.")
    _post(cached, body, key="sk-alpha")
    assert _post(cached, body, key="sk-alpha").headers["x-leangate-cache"] == "hit-exact"
    assert _post(cached, body, key="sk-beta").headers["x-leangate-cache"] == "miss"
    assert _post(cached, body, key="sk-unknown").headers["x-leangate-cache"] == "miss"


def test_cache_control_and_ttl(cached: ProxyThread) -> None:
    body = _chat(f"Count to three. Ref {_unique()}.")
    assert (
        _post(cached, body, **{"cache-control": "no-store"}).headers["x-leangate-cache"] == "miss"
    )
    assert _post(cached, body).headers["x-leangate-cache"] == "miss", "no-store stored nothing"
    assert _post(cached, body).headers["x-leangate-cache"] == "hit-exact"
    assert (
        _post(cached, body, **{"cache-control": "no-cache"}).headers["x-leangate-cache"] == "miss"
    )

    short = _chat(f"Count to four. Ref {_unique()}.", leangate={"cache_ttl_s": 1})
    _post(cached, short)
    assert _post(cached, short).headers["x-leangate-cache"] == "hit-exact"
    time.sleep(1.3)
    assert _post(cached, short).headers["x-leangate-cache"] == "miss"


def test_requests_can_narrow_the_policy(cached: ProxyThread) -> None:
    body = _chat(f"Say cheese. Ref {_unique()}.")
    _post(cached, body)
    assert _post(cached, body).headers["x-leangate-cache"] == "hit-exact"
    assert "x-leangate-cache" not in _post(cached, body, **{"x-leangate-stages": "none"}).headers
    assert "x-leangate-cache" not in _post(cached, body, **{"x-leangate-disable": "cache"}).headers
    narrowed = _chat(f"Say cheese. Ref {_unique()}.", leangate={"stages": []})
    assert "x-leangate-cache" not in _post(cached, narrowed).headers


def test_errors_are_not_stored(cached: ProxyThread, vllm_url: str) -> None:
    too_long = _chat(too_long_prompt(vllm_url))
    for _ in range(2):
        response = httpx.post(
            cached.url + "/v1/chat/completions",
            json=too_long,
            headers={"authorization": "Bearer sk-alpha"},
        )
        assert response.status_code == 400
        assert response.headers.get("x-leangate-cache") is None


def test_singleflight_coalesces_identical_misses(cached: ProxyThread) -> None:
    body = _chat(f"Explain rain. Ref {_unique()}.", max_tokens=48, ignore_eos=True)
    before = backend_requests(cached)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=60)) as http:
            calls = [
                http.post(
                    cached.url + "/v1/chat/completions",
                    json=body,
                    headers={"authorization": "Bearer sk-alpha"},
                )
                for _ in range(50)
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert backend_requests(cached) - before == 1
    kinds = sorted({r.headers["x-leangate-cache"] for r in responses})
    assert "miss" in kinds and set(kinds) <= {"miss", "coalesced", "hit-exact"}
    texts = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert len(texts) == 1


class _Timed:
    """One streamed request's headers, text, and when its first and last chunks came."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.text = ""
        self.first = self.last = 0.0
        self.started = asyncio.Event()

    async def read(self, http: httpx.AsyncClient, url: str, body: dict[str, object]) -> None:
        async with http.stream(
            "POST", url, json=body, headers={"authorization": "Bearer sk-alpha"}
        ) as response:
            assert response.status_code == 200
            self.headers = dict(response.headers)
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if not self.first:
                    self.first = time.monotonic()
                    self.started.set()
                for choice in orjson.loads(line[6:]).get("choices") or []:
                    self.text += choice.get("delta", {}).get("content") or ""
            self.last = time.monotonic()


def test_a_coalesced_stream_follows_the_leader_live(cached: ProxyThread) -> None:
    body = _chat(
        f"Tell a long story about {_unique()}.", stream=True, max_tokens=160, ignore_eos=True
    )
    before = backend_requests(cached)

    async def leader_and_follower() -> tuple[_Timed, _Timed]:
        leader, follower = _Timed(), _Timed()
        url = cached.url + "/v1/chat/completions"
        async with httpx.AsyncClient(timeout=180) as http:
            leading = asyncio.create_task(leader.read(http, url, body))
            await asyncio.wait_for(leader.started.wait(), 120)
            await follower.read(http, url, body)
            await leading
        return leader, follower

    leader, follower = asyncio.run(leader_and_follower())
    assert leader.headers["x-leangate-cache"] == "miss"
    assert follower.headers["x-leangate-cache"] == "coalesced"
    assert follower.text == leader.text and leader.text
    assert backend_requests(cached) - before == 1
    streaming = leader.last - leader.first
    assert streaming > 1.0, "the leader's stream should take a while on CPU vLLM"
    assert follower.first < leader.last - streaming / 2, (
        f"the follower's first chunk came {leader.last - follower.first:.2f} s before the "
        f"leader's stream ended, of {streaming:.2f} s"
    )


def test_admin_purge_by_tenant(cached: ProxyThread) -> None:
    body = _chat(f"Purge me. Ref {_unique()}.")
    _post(cached, body, key="sk-beta")
    assert _post(cached, body, key="sk-beta").headers["x-leangate-cache"] == "hit-exact"
    denied = httpx.post(cached.url + "/admin/cache/purge", json={"tenant": "beta"})
    assert denied.status_code == 401 and "error" in denied.json()
    purged = httpx.post(
        cached.url + "/admin/cache/purge",
        json={"tenant": "beta"},
        headers={"authorization": "Bearer admin"},
    )
    assert purged.status_code == 200 and purged.json()["deleted"] >= 1
    assert _post(cached, body, key="sk-beta").headers["x-leangate-cache"] == "miss"


# --- semantic, across replicas ---------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(
    vllm_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyThread, ProxyThread]]:
    policy = write_policy(tmp_path_factory.mktemp("semantic"), _policy(semantic=True))
    settings = proxy_settings(vllm_url, policy=policy, redis_url=redis_url)
    with ProxyThread(settings) as first, ProxyThread(settings) as second:
        yield first, second


def test_semantic_hit_is_seen_by_another_replica(replicas: tuple[ProxyThread, ProxyThread]) -> None:
    first, second = replicas
    tag = _unique()
    origin = _post(first, _chat(f"How do I bake sourdough bread at home, {tag} style?"))
    assert origin.headers["x-leangate-cache"] == "miss"
    deadline = time.monotonic() + 1.0
    while True:
        hit = _post(second, _chat(f"How can I bake sourdough bread at home, {tag} style?"))
        if hit.headers["x-leangate-cache"] == "hit-semantic" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert hit.headers["x-leangate-cache"] == "hit-semantic"
    assert float(hit.headers["x-leangate-cache-similarity"]) > 0.8
    assert "cache-embed;dur=" in hit.headers["server-timing"]
    assert hit.json()["choices"] == origin.json()["choices"]


def test_semantic_guards_and_tenants(replicas: tuple[ProxyThread, ProxyThread]) -> None:
    first, _ = replicas
    tag = _unique()
    _post(first, _chat(f"How do I install Python 3.11 on Ubuntu ({tag})?"))
    assert (
        _post(first, _chat(f"How do I install Python 3.12 on Ubuntu ({tag})?")).headers[
            "x-leangate-cache"
        ]
        == "miss"
    )
    _post(first, _chat(f"Is Paris the capital of France ({tag})?"))
    assert (
        _post(first, _chat(f"Is Paris not the capital of France ({tag})?")).headers[
            "x-leangate-cache"
        ]
        == "miss"
    )
    paraphrase = _chat(f"Is Paris the French capital ({tag})?")
    assert _post(first, paraphrase, key="sk-beta").headers["x-leangate-cache"] == "miss"


def test_follow_up_turn_does_not_hit_a_single_turn_entry(
    replicas: tuple[ProxyThread, ProxyThread],
) -> None:
    first, _ = replicas
    question = f"What is the boiling point of water ({_unique()})?"
    _post(first, _chat(question))
    follow_up = _chat(question)
    follow_up["messages"] = [
        {"role": "user", "content": "Let's talk about cooking."},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": question},
    ]
    assert _post(first, follow_up).headers["x-leangate-cache"] == "miss"


# --- Redis going away ------------------------------------------------------------------------


def test_redis_killed_mid_run_then_recovers(vllm_url: str, tmp_path: Path) -> None:
    port = free_port()
    redis_process = start_redis(port, tmp_path)
    policy = write_policy(tmp_path, _policy(semantic=False))
    settings = proxy_settings(vllm_url, policy=policy, redis_url=f"redis://127.0.0.1:{port}/0")
    try:
        with ProxyThread(settings) as proxy:
            body = _chat(f"Say yes. Ref {_unique()}.")
            _post(proxy, body)
            assert _post(proxy, body).headers["x-leangate-cache"] == "hit-exact"
            redis_process.kill()
            redis_process.wait()
            for _ in range(3):
                answer = _post(proxy, body)
                assert answer.json()["choices"][0]["message"]["content"]
                assert answer.headers.get("x-leangate-cache") != "hit-exact"
            metrics = httpx.get(proxy.url + "/metrics").text
            assert 'leangate_cache_errors_total{operation="lookup"}' in metrics, (
                "a dead store is a counted miss"
            )
            redis_process = start_redis(port, tmp_path)
            deadline = time.monotonic() + 15
            status = ""
            while time.monotonic() < deadline and status != "hit-exact":
                _post(proxy, body)
                time.sleep(0.3)
                status = _post(proxy, body).headers.get("x-leangate-cache", "")
            assert status == "hit-exact", "the cache came back once Redis did"
    finally:
        redis_process.kill()
        redis_process.wait()
