"""Tenants probing each other through the result cache and the admin API, and callers
trying to pick the backend, with a fake backend that takes a known time and the real
Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, ProxyThread, free_port, proxy_settings, write_policy

from leangate.backend.transport import HttpxTransport
from leangate.bench.common import metric_total

BACKEND_S = 0.3
MODELS = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
POLICY = """
tenants:
  alpha: {api_keys: [sk-alpha]}
  beta: {api_keys: [sk-beta]}
rules:
  - name: cached
    stages: [{use: cache}]
"""


hosts_seen: set[str] = set()


async def _backend(request: httpx.Request) -> httpx.Response:
    hosts_seen.add(request.url.host)
    if request.url.path == "/v1/models":
        return httpx.Response(200, json=MODELS)
    await asyncio.sleep(BACKEND_S)
    content = json.loads(request.content)["messages"][0]["content"]
    answer = {"role": "assistant", "content": f"answer to {content}"}
    return httpx.Response(
        200,
        json={
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        },
    )


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ProxyThread]:
    policy = write_policy(tmp_path_factory.mktemp("isolation"), POLICY)
    settings = proxy_settings(
        "http://backend.test", policy=policy, redis_url=redis_url, admin_api_key="root"
    )
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as running:
        yield running


def _ask(proxy: ProxyThread, key: str, question: str) -> tuple[httpx.Response, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0}
    started = time.perf_counter()
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    return response, time.perf_counter() - started


def test_another_tenant_cannot_tell_by_timing_that_an_answer_is_cached(
    proxy: ProxyThread,
) -> None:
    question = f"What did alpha ask? {uuid.uuid4().hex}"
    _ask(proxy, "sk-alpha", question)
    hit, hit_s = _ask(proxy, "sk-alpha", question)
    sent_before = metric_total(proxy.url, "leangate_backend_requests_total")
    probe, probe_s = _ask(proxy, "sk-beta", question)
    sent_after = metric_total(proxy.url, "leangate_backend_requests_total")
    assert hit.headers["x-leangate-cache"] == "hit-exact" and hit_s < BACKEND_S
    assert probe.headers["x-leangate-cache"] == "miss"
    assert sent_after == sent_before + 1, "beta's probe went to the backend, as any miss"
    assert probe_s >= BACKEND_S, "as long as any miss"


def test_tenant_keys_open_no_admin_route(proxy: ProxyThread) -> None:
    for key in ("sk-alpha", "sk-beta"):
        headers = {"authorization": f"Bearer {key}"}
        purge = httpx.post(
            f"{proxy.url}/admin/cache/purge", json={"tenant": "alpha"}, headers=headers
        )
        listing = httpx.get(f"{proxy.url}/admin/keys", headers=headers)
        making = httpx.post(f"{proxy.url}/admin/keys", json={"tenant": "alpha"}, headers=headers)
        assert (purge.status_code, listing.status_code, making.status_code) == (401, 401, 401)


def test_keys_are_never_logged(proxy: ProxyThread, caplog: pytest.LogCaptureFixture) -> None:
    admin = {"authorization": "Bearer root"}
    with caplog.at_level(logging.DEBUG):
        made = httpx.post(f"{proxy.url}/admin/keys", json={"tenant": "alpha"}, headers=admin)
        key = made.json()["api_key"]
        _ask(proxy, key, f"Who am I? {uuid.uuid4().hex}")
        _ask(proxy, "sk-alpha", f"And now? {uuid.uuid4().hex}")
        httpx.delete(f"{proxy.url}/admin/keys/{made.json()['sha256']}", headers=admin)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert key not in logged and "sk-alpha" not in logged and "root" not in logged


def test_callers_cannot_choose_where_the_proxy_connects(proxy: ProxyThread) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Where to? {uuid.uuid4().hex}"}],
        "base_url": "http://evil.test/v1",
        "api_base": "http://evil.test",
        "leangate": {"stages": []},
    }
    headers = {"x-forwarded-host": "evil.test", "host": "evil.test", "forwarded": "host=evil"}
    routed = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers)
    as_model = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json={**body, "model": "http://evil.test/v1"},
    )
    assert routed.status_code == 200 and as_model.status_code == 404
    assert hosts_seen == {"backend.test"}


def test_an_unreachable_key_store_is_a_clean_503_and_the_service_stays_up(
    tmp_path: Path,
) -> None:
    """With ``require_api_key``, a key the policy does not list is looked up in Redis; a
    Redis that cannot answer refuses the request (never an open door) with an OpenAI-style
    503 at once, and everything that needs no lookup goes on."""
    policy = write_policy(tmp_path, "require_api_key: true" + POLICY)
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    settings = proxy_settings("http://backend.test", policy=policy, redis_url=nowhere)
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as proxy:
        refused, refused_s = _ask(proxy, f"sk-unknown-{uuid.uuid4().hex}", "Let me in?")
        again, _ = _ask(proxy, f"sk-unknown-{uuid.uuid4().hex}", "Let me in?")
        listed, _ = _ask(proxy, "sk-alpha", f"Still there? {uuid.uuid4().hex}")
        health = httpx.get(f"{proxy.url}/health", timeout=10)
        corpora = httpx.get(
            f"{proxy.url}/v1/corpora", headers={"authorization": "Bearer sk-nobody"}, timeout=10
        )
    expected = {
        "error": {
            "message": "API keys cannot be checked now; retry",
            "type": "service_unavailable",
            "code": "key_store_unavailable",
        }
    }
    for response in (refused, again, corpora):
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json() == expected
    assert refused_s < 2.0, "refused at once, not after a timeout"
    assert listed.status_code == 200
    assert listed.json()["choices"][0]["message"]["content"].startswith("answer to Still there?")
    assert health.status_code == 200 and health.json()["status"] == "ok"
