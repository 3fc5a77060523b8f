"""Failure paths at the HTTP edge, with the backend faked by ``httpx.MockTransport``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from conftest import MODEL, ProxyThread, proxy_settings

from leangate.backend.transport import HttpxTransport

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MODELS = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}


def _chunk(text: str) -> bytes:
    event = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class _DiesMidStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield _chunk("Hel")
        yield _chunk("lo")
        raise httpx.ReadError("connection reset by peer")


def _backend(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json=MODELS)
    scenario = json.loads(request.content).get("user", "")
    if scenario == "refused":
        raise httpx.ConnectError("connection refused")
    if scenario == "slow":
        raise httpx.ReadTimeout("timed out")
    if scenario == "too-long":
        error = {"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}}
        return httpx.Response(400, json=error)
    if scenario == "dies":
        return httpx.Response(
            200, stream=_DiesMidStream(), headers={"content-type": "text/event-stream"}
        )
    if scenario == "no-done":
        return httpx.Response(
            200, content=_chunk("Hi"), headers={"content-type": "text/event-stream"}
        )
    if scenario == "half-event":
        return httpx.Response(
            200,
            content=_chunk("Hi") + _chunk("there")[:20],
            headers={"content-type": "text/event-stream"},
        )
    return httpx.Response(200, json={"object": "chat.completion", "choices": []})


class _StreamingMockTransport(httpx.MockTransport):
    """``MockTransport`` reads each response whole; this one leaves streams to the client,
    so a stream can fail half-way."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = self.handler(request)
        assert isinstance(response, httpx.Response)
        return response


@pytest.fixture(scope="module")
def faked() -> Iterator[ProxyThread]:
    settings = proxy_settings("http://backend.test", max_body_bytes=2000)
    transport = HttpxTransport(_StreamingMockTransport(_backend))
    with ProxyThread(settings, transport) as running:
        yield running


def _post(proxy: ProxyThread, **fields: object) -> httpx.Response:
    return httpx.post(proxy.url + "/v1/chat/completions", json={**CHAT, **fields})


def _assert_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error: dict[str, object] = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    return error


def test_backend_timeout_is_504(faked: ProxyThread) -> None:
    _assert_error(_post(faked, user="slow"), 504)


def test_backend_4xx_passes_through_unchanged(faked: ProxyThread) -> None:
    response = _post(faked, user="too-long")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "prompt too long"


def test_body_over_limit_is_413(faked: ProxyThread) -> None:
    _assert_error(_post(faked, user="x" * 5000), 413)


def test_malformed_and_invalid_requests_are_400(faked: ProxyThread) -> None:
    bad_json = httpx.post(faked.url + "/v1/chat/completions", content=b'{"model": ')
    assert _assert_error(bad_json, 400)["code"] == "invalid_json"
    not_object = httpx.post(faked.url + "/v1/chat/completions", content=b"[1, 2]")
    _assert_error(not_object, 400)
    wrong_type = _assert_error(_post(faked, max_tokens="many"), 400)
    assert "max_tokens" in str(wrong_type["message"])
    bad_option = _assert_error(_post(faked, leangate={"nonsense": 1}), 400)
    assert "leangate.nonsense" in str(bad_option["message"])
    unknown_stage = _assert_error(_post(faked, leangate={"stages": ["nope"]}), 400)
    assert "nope" in str(unknown_stage["message"])
    _assert_error(_post(faked, model="other-model"), 404)
    assert httpx.get(faked.url + "/health").status_code == 200


def test_stream_cut_short_ends_with_an_error_event(faked: ProxyThread) -> None:
    for scenario in ("dies", "no-done", "half-event"):
        client = openai.OpenAI(base_url=faked.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.APIError):
            for _ in client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                user=scenario,
            ):
                pass
        raw = httpx.post(
            faked.url + "/v1/chat/completions", json={**CHAT, "stream": True, "user": scenario}
        )
        events = [line for line in raw.text.split("\n\n") if line]
        assert "data: [DONE]" not in raw.text
        assert json.loads(events[-1].removeprefix("data: "))["error"]["type"] in {"bad_gateway"}


def test_unreachable_backend_is_503_and_health_reports_it_until_it_recovers(
    faked: ProxyThread,
) -> None:
    response = _post(faked, user="refused")
    assert _assert_error(response, 503)["code"] == "service_unavailable"
    assert httpx.get(faked.url + "/health").status_code == 503, "the replica refused: down"
    deadline = time.monotonic() + 15  # the next health check finds /v1/models answering
    while httpx.get(faked.url + "/health").status_code != 200:
        assert time.monotonic() < deadline, "the replica never came back"
        time.sleep(0.2)
