"""Cache statistics: the admin route, the client and the CLI count the same entries, per
tenant, in the real Redis; the backend is faked."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, ProxyThread, proxy_settings, write_policy

from leangate.admin_client import AdminClient, AdminError
from leangate.backend.transport import HttpxTransport

POLICY = """
tenants:
  t-%(tag)s: {api_keys: [key-%(tag)s]}
rules:
  - name: cached
    stages: [{use: cache}]
"""


def _backend(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
    message = {"role": "assistant", "content": "fine"}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return httpx.Response(200, json={"object": "chat.completion", "choices": [choice]})


def test_stats_count_one_tenants_answers_and_lookups(tmp_path: Path, redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    policy = write_policy(tmp_path, POLICY % {"tag": tag})
    settings = proxy_settings(
        "http://backend.test", policy=policy, redis_url=redis_url, admin_api_key="root"
    )
    headers = {"authorization": f"Bearer key-{tag}"}
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as proxy:
        for question in ("one", "two", "one"):
            messages = [{"role": "user", "content": question}]
            body = {"model": MODEL, "messages": messages, "temperature": 0}
            url = f"{proxy.url}/v1/chat/completions"
            httpx.post(url, json=body, headers=headers).raise_for_status()
        with AdminClient(proxy.url, admin_key="root") as admin:
            stats = admin.cache_stats(tenant=f"t-{tag}")
        with AdminClient(proxy.url, admin_key="wrong") as outsider, pytest.raises(AdminError):
            outsider.cache_stats(tenant=f"t-{tag}")
    assert stats.store == "redis"
    assert stats.entries == {"answers": 2, "semantic": 0}
    assert stats.lookups == {"exact-hit": 1, "exact-miss": 2}
    command = [sys.executable, "-m", "leangate", "cache", "stats", "--redis-url", redis_url]
    done = subprocess.run(
        [*command, "--tenant", f"t-{tag}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2 answers, 0 semantic entries"
