"""Per-tenant limits at the edge, with the backend faked by ``httpx.MockTransport`` and the
counters in the real Redis (shared by two proxies) or in memory."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, ProxyThread, free_port, proxy_settings, write_policy

from leangate.admin_client import AdminClient, AdminError
from leangate.backend.transport import HttpxTransport
from leangate.bench.common import metric_total
from leangate.middleware.limits import Limits
from leangate.middleware.policy import parse_policy

MODELS = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
ANSWER = {"object": "chat.completion", "choices": [], "usage": {"total_tokens": 2}}


class _SlowStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(3):
            await asyncio.sleep(0.3)
            yield b'data: {"choices": []}\n\n'
        yield b"data: [DONE]\n\n"


async def _backend(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json=MODELS)
    body = json.loads(request.content)
    if body.get("stream"):
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, stream=_SlowStream(), headers=headers)
    if body.get("user") == "slow":
        await asyncio.sleep(1.0)
    return httpx.Response(200, json={**ANSWER, "max_tokens_seen": body.get("max_tokens")})


class _Transport(httpx.MockTransport):
    """Leaves streams to the client, so a stream lasts as long as its events."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.handler(request)  # type: ignore[misc]
        assert isinstance(response, httpx.Response)
        return response


def _proxy(tmp_path: Path, policy: str, redis_url: str | None = None) -> ProxyThread:
    path = write_policy(tmp_path, policy, f"policy-{uuid.uuid4().hex[:6]}.yaml")
    settings = proxy_settings("http://backend.test", policy=path, redis_url=redis_url)
    return ProxyThread(settings, HttpxTransport(_Transport(_backend)))


def _policy(limits: str, tenant_limits: str = "{}") -> tuple[str, str, str]:
    """A policy with two tenants (fresh names: Redis counters outlive a run) and their keys."""
    tag = uuid.uuid4().hex[:8]
    text = f"""
limits: {limits}
tenants:
  a-{tag}: {{api_keys: [key-a-{tag}], limits: {tenant_limits}}}
  b-{tag}: {{api_keys: [key-b-{tag}]}}
rules: []
"""
    return text, f"key-a-{tag}", f"key-b-{tag}"


def _chat(proxy: ProxyThread, key: str, **fields: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_a_tenants_override_replaces_only_the_fields_it_names() -> None:
    text, _, _ = _policy("{requests_per_minute: 10, max_tokens: 50}", "{max_tokens: 20}")
    policy = parse_policy(text)
    tenant_a, tenant_b = list(policy.tenants)
    assert policy.limits_for(tenant_a) == Limits(requests_per_minute=10, max_tokens=20)
    assert policy.limits_for(tenant_b) == Limits(requests_per_minute=10, max_tokens=50)
    assert parse_policy("rules: []").limits_for("anyone") is None


def test_request_rate_is_shared_by_two_proxies_through_redis(
    tmp_path: Path, redis_url: str
) -> None:
    text, key_a, key_b = _policy("{requests_per_minute: 3}")
    with _proxy(tmp_path, text, redis_url) as one, _proxy(tmp_path, text, redis_url) as two:
        statuses = [_chat(proxy, key_a).status_code for proxy in (one, two, one)]
        refused = _chat(two, key_a)
        other_tenant = _chat(one, key_b)
        refusals = metric_total(two.url, "leangate_limited_total")
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert other_tenant.status_code == 200
    assert refusals == 1


def test_tokens_per_minute_count_the_prompt_and_the_answer_asked_for(tmp_path: Path) -> None:
    text, key_a, _ = _policy("{tokens_per_minute: 100}")
    with _proxy(tmp_path, text) as proxy:
        first = _chat(proxy, key_a, max_tokens=60)
        second = _chat(proxy, key_a, max_tokens=60)
        alone_too_big = _chat(proxy, key_a, max_tokens=200, n=1)
    assert first.status_code == 200
    assert second.status_code == 429 and "retry-after" in second.headers
    assert alone_too_big.status_code == 413
    assert alone_too_big.json()["error"]["code"] == "tokens_over_limit"


def test_size_limits_of_one_request(tmp_path: Path) -> None:
    text, key_a, key_b = _policy("{max_messages: 2, max_tokens: 30}", "{max_body_bytes: 400}")
    many = [{"role": "user", "content": "hi"}] * 3
    with _proxy(tmp_path, text) as proxy:
        too_many = _chat(proxy, key_b, messages=many)
        over_ceiling = _chat(proxy, key_b, max_tokens=31)
        filled = _chat(proxy, key_b)
        big = _chat(proxy, key_a, messages=[{"role": "user", "content": "x" * 500}])
        small_for_b = _chat(proxy, key_b, messages=[{"role": "user", "content": "x" * 500}])
        healthy = httpx.get(f"{proxy.url}/health")
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_messages"
    assert over_ceiling.status_code == 400
    assert over_ceiling.json()["error"]["code"] == "max_tokens_over_limit"
    assert filled.status_code == 200 and filled.json()["max_tokens_seen"] == 30
    assert big.status_code == 413 and small_for_b.status_code == 200
    assert healthy.status_code == 200


@pytest.mark.parametrize("redis", [False, True])
def test_concurrent_requests_hold_a_slot_until_their_stream_ends(
    tmp_path: Path, redis_url: str, redis: bool
) -> None:
    text, key_a, key_b = _policy("{concurrent_requests: 1}")
    with _proxy(tmp_path, text, redis_url if redis else None) as proxy:
        with ThreadPoolExecutor(2) as pool:
            streaming = pool.submit(_chat, proxy, key_a, stream=True)
            slow = pool.submit(_chat, proxy, key_b, user="slow")
            time.sleep(0.3)
            meanwhile = _chat(proxy, key_a)
            other_tenant_meanwhile = _chat(proxy, key_b)
            assert streaming.result().status_code == 200 and slow.result().status_code == 200
        after = _chat(proxy, key_a)
    assert meanwhile.status_code == 429, meanwhile.text
    assert meanwhile.headers["retry-after"] == "1"
    assert other_tenant_meanwhile.status_code == 429  # b's slot is its slow request's
    assert after.status_code == 200


def test_a_dead_limit_store_admits_and_counts(tmp_path: Path) -> None:
    text, key_a, _ = _policy("{requests_per_minute: 1, concurrent_requests: 1}")
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with _proxy(tmp_path, text, nowhere) as proxy:
        statuses = [_chat(proxy, key_a).status_code for _ in range(3)]
        failures = metric_total(proxy.url, "leangate_limit_store_failures_total")
    assert statuses == [200, 200, 200]
    assert failures >= 1


@pytest.fixture
def admin_proxy(tmp_path: Path, redis_url: str) -> Iterator[tuple[ProxyThread, str]]:
    tag = uuid.uuid4().hex[:8]
    text = f"require_api_key: true\ntenants:\n  t-{tag}: {{limits: {{max_tokens: 7}}}}\n"
    path = write_policy(tmp_path, text + "rules: []\n")
    settings = proxy_settings(
        "http://backend.test", policy=path, redis_url=redis_url, admin_api_key="root"
    )
    with ProxyThread(settings, HttpxTransport(_Transport(_backend))) as proxy:
        yield proxy, f"t-{tag}"


def test_keys_made_in_redis_work_at_once_and_stop_when_revoked(
    admin_proxy: tuple[ProxyThread, str],
) -> None:
    proxy, tenant = admin_proxy
    refused = httpx.post(f"{proxy.url}/admin/keys", json={"tenant": tenant})
    assert refused.status_code == 401
    with AdminClient(proxy.url, admin_key="root") as admin:
        made = admin.create_key(tenant)
        assert made.api_key is not None
        answer = _chat(proxy, made.api_key)
        assert answer.status_code == 200
        assert answer.json()["max_tokens_seen"] == 7, "the key is the tenant's: its limits apply"
        listed = admin.list_keys(tenant)
        assert [(k.sha256, k.tenant, k.api_key) for k in listed] == [(made.sha256, tenant, None)]
        admin.revoke_key(made.sha256)
        assert _chat(proxy, made.api_key).status_code == 401
        with pytest.raises(AdminError) as gone:
            admin.revoke_key(made.sha256)
    assert gone.value.status == 404
