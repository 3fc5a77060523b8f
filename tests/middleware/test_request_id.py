"""A client's ``x-request-id``: echoed on the answer, and sent to the backend with a suffix
unique to each call (vLLM names its request after it and needs it unique)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import MODEL, ProxyThread, proxy_settings, write_policy

from leangate.backend.transport import HttpxTransport

MODELS = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
ANSWER = {
    "object": "chat.completion",
    "model": MODEL,
    "id": "chatcmpl-1",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
POLICY = """
rules:
  - name: cached
    stages: [{use: cache}]
"""

sent_ids: list[str | None] = []


def _backend(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json=MODELS)
    sent_ids.append(request.headers.get("x-request-id"))
    return httpx.Response(200, json=ANSWER)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    policy = write_policy(tmp_path_factory.mktemp("request-id"), POLICY)
    settings = proxy_settings("http://backend.test", policy=policy)
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as running:
        yield running


def _ask(proxy: ProxyThread, question: str, request_id: str | None) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0}
    headers = {} if request_id is None else {"x-request-id": request_id}
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_the_id_is_echoed_and_each_backend_call_gets_its_own(proxy: ProxyThread) -> None:
    before = len(sent_ids)
    first = _ask(proxy, "first question", "trace-7:a.b")
    second = _ask(proxy, "second question", "trace-7:a.b")
    assert first.headers["x-request-id"] == second.headers["x-request-id"] == "trace-7:a.b"
    ids = sent_ids[before:]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(i is not None and i.startswith("trace-7:a.b-") for i in ids), ids


def test_a_cache_hit_echoes_the_id_too(proxy: ProxyThread) -> None:
    _ask(proxy, "asked twice", "first-ask")
    before = len(sent_ids)
    hit = _ask(proxy, "asked twice", "second-ask")
    assert hit.headers["x-leangate-cache"] == "hit-exact"
    assert hit.headers["x-request-id"] == "second-ask"
    assert len(sent_ids) == before


@pytest.mark.parametrize("given", [None, "has spaces", "x" * 129, "new\u00e9line"])
def test_no_id_or_one_not_passed_on_is_ignored(proxy: ProxyThread, given: str | None) -> None:
    before = len(sent_ids)
    headers = {} if given is None else {b"x-request-id": given.encode("utf-8")}
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"q {given!r}"}]}
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    assert "x-request-id" not in response.headers
    assert sent_ids[before:] == [None]
