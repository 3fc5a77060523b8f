"""The backend's other endpoints (embeddings, tokenize, ...) forwarded as they are, under the
edge's keys and limits, with a fake backend that records what reached it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import MODEL, ProxyThread, proxy_settings, write_policy

from leangate.backend.transport import HttpxTransport
from leangate.bench.common import metric_total

MODELS = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
EMBEDDING = {"object": "list", "data": [{"index": 0, "embedding": [0.25, -0.5]}], "model": MODEL}
POLICY = """
require_api_key: true
tenants:
  alpha: {api_keys: [sk-alpha]}
  slow: {api_keys: [sk-slow], limits: {requests_per_minute: 1}}
  small: {api_keys: [sk-small], limits: {tokens_per_minute: 10}}
rules: []
"""

received: list[httpx.Request] = []


def _backend(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json=MODELS)
    received.append(request)
    if request.url.path == "/v1/embeddings":
        return httpx.Response(200, content=orjson.dumps(EMBEDDING), headers=_json())
    if request.url.path == "/tokenize":
        error = {"error": {"message": "prompt is required", "type": "BadRequestError"}}
        return httpx.Response(400, content=orjson.dumps(error), headers=_json())
    return httpx.Response(404, json={"detail": "Not Found"})


def _json() -> dict[str, str]:
    return {"content-type": "application/json"}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    policy = write_policy(tmp_path_factory.mktemp("forwarding"), POLICY)
    settings = proxy_settings("http://backend.test", policy=policy, max_body_bytes=2000)
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as running:
        yield running


def _post(
    proxy: ProxyThread, path: str, body: bytes, key: str | None = "sk-alpha"
) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(f"{proxy.url}{path}", content=body, headers=headers, timeout=30)


def test_an_embeddings_call_reaches_the_backend_and_comes_back_byte_for_byte(
    proxy: ProxyThread,
) -> None:
    body = b'{"model": "%s", "input": ["a", "b"], "encoding_format": "float"}' % MODEL.encode()
    before = len(received)
    response = _post(proxy, "/v1/embeddings", body)
    assert response.status_code == 200
    assert response.content == orjson.dumps(EMBEDDING)
    assert [r.content for r in received[before:]] == [body], "the body was changed on its way"
    assert "sk-alpha" not in str(received[-1].headers), "the client's key reached the backend"
    assert metric_total(proxy.url, "leangate_requests_total", route="/v1/embeddings") >= 1


def test_the_backends_error_status_and_body_pass_through(proxy: ProxyThread) -> None:
    response = _post(proxy, "/tokenize", b'{"model": "%s"}' % MODEL.encode())
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "prompt is required"


def test_a_call_without_a_model_goes_to_the_one_model_served(proxy: ProxyThread) -> None:
    before = len(received)
    response = _post(proxy, "/v1/embeddings", b'{"input": "a"}')
    assert response.status_code == 200
    assert len(received) == before + 1


@pytest.mark.parametrize(
    ("body", "key", "status", "code"),
    [
        (b'{"model": "m", "input": "a"}', None, 401, "invalid_api_key"),
        (b'{"model": "m", "input": "a"}', "sk-unknown", 401, "invalid_api_key"),
        (b"{not json", "sk-alpha", 400, "invalid_json"),
        (b'["a list"]', "sk-alpha", 400, "invalid_json"),
        (b'{"model": 7, "input": "a"}', "sk-alpha", 400, "invalid_request"),
        (b'{"model": "no-such-model", "input": "a"}', "sk-alpha", 404, "model_not_found"),
        (b'{"input": "%s"}' % (b"x" * 3000), "sk-alpha", 413, "request_too_large"),
        (b'{"input": "%s"}' % (b"x" * 100), "sk-small", 413, "tokens_over_limit"),
    ],
)
def test_bad_calls_get_a_clear_error_and_never_reach_the_backend(
    proxy: ProxyThread, body: bytes, key: str | None, status: int, code: str
) -> None:
    before = len(received)
    response = _post(proxy, "/v1/embeddings", body, key)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert len(received) == before


def test_a_tenants_request_rate_applies(proxy: ProxyThread) -> None:
    first = _post(proxy, "/v1/embeddings", b'{"input": "a"}', "sk-slow")
    second = _post(proxy, "/v1/embeddings", b'{"input": "b"}', "sk-slow")
    assert first.status_code == 200
    assert second.status_code == 429 and second.headers["retry-after"]


def test_a_path_not_listed_is_not_forwarded(proxy: ProxyThread) -> None:
    before = len(received)
    response = _post(proxy, "/v1/audio/transcriptions", b'{"model": "m"}')
    assert response.status_code in (404, 405)
    assert len(received) == before


def test_forwarding_can_be_turned_off(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "rules: []\n")
    settings = proxy_settings("http://backend.test", policy=policy, forward_paths=[])
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as running:
        before = len(received)
        response = _post(running, "/v1/embeddings", b'{"input": "a"}')
    assert response.status_code in (404, 405)
    assert len(received) == before


def test_an_unknown_model_is_not_a_metrics_label(proxy: ProxyThread) -> None:
    _post(proxy, "/v1/embeddings", b'{"model": "made-up-7f3a", "input": "a"}')
    assert "made-up-7f3a" not in httpx.get(f"{proxy.url}/metrics", timeout=10).text


def test_a_forwarded_call_carries_the_request_id(proxy: ProxyThread) -> None:
    body = b'{"input": "a"}'
    response = httpx.post(
        f"{proxy.url}/v1/embeddings",
        content=body,
        headers={"authorization": "Bearer sk-alpha", "x-request-id": "emb-1"},
        timeout=30,
    )
    assert response.headers["x-request-id"] == "emb-1"
    assert received[-1].headers["x-request-id"].startswith("emb-1-")
