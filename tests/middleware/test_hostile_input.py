"""Hostile requests: each gets a clear OpenAI-style 4xx, and the proxy serves on.

A prompt longer than the model's context is the backend's to refuse; that one is tested
against the real vLLM in ``tests/integration/test_proxy_vllm.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import MODEL, ProxyThread, proxy_settings, write_policy
from fake_backend import fake_transport

from leangate.middleware.protocol import MAX_ANSWER_TOKENS, MAX_CHOICES

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MAX_BODY = 256 * 1024
BIG_MAX_BODY = 64 * 1024 * 1024
POLICY = "rules:\n  - name: all\n    stages: [{use: cache}]\n"


def _proxy(folder: Any, max_body_bytes: int) -> ProxyThread:
    settings = proxy_settings(
        "http://backend.test",
        policy=write_policy(folder, POLICY),
        corpus_dir=folder / "corpora",
        max_body_bytes=max_body_bytes,
    )
    return ProxyThread(settings, fake_transport())


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    with _proxy(tmp_path_factory.mktemp("hostile"), MAX_BODY) as running:
        yield running


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    """A proxy whose body limit lets a million documents in."""
    with _proxy(tmp_path_factory.mktemp("roomy"), BIG_MAX_BODY) as running:
        yield running


def _post(proxy: ProxyThread, body: bytes | Any, path: str = "/v1/chat/completions") -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(proxy.url + path, content=content, timeout=60)


def _refused(response: httpx.Response, status: int, code: str) -> str:
    """The response is an OpenAI-style error with ``status`` and ``code``; its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code, error
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    return str(error["message"])


def _serving(proxy: ProxyThread) -> None:
    assert httpx.get(proxy.url + "/health").status_code == 200
    answer = _post(proxy, {**CHAT, "messages": [{"role": "user", "content": "still there?"}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "ok"


def test_a_body_over_the_limit_is_413_whether_declared_or_not(proxy: ProxyThread) -> None:
    big = json.dumps({**CHAT, "user": "x" * MAX_BODY}).encode()
    _refused(_post(proxy, big), 413, "request_too_large")

    def undeclared() -> Iterator[bytes]:
        for start in range(0, len(big), 16 * 1024):
            yield big[start : start + 16 * 1024]

    response = httpx.post(proxy.url + "/v1/chat/completions", content=undeclared())
    _refused(response, 413, "request_too_large")
    _serving(proxy)


@pytest.mark.parametrize("depth", [100, 300, 2000, 100_000])
def test_deeply_nested_json_is_400(proxy: ProxyThread, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = (
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], '
        f'"leangate": {{}}, "deep": {nested}}}'
    ).encode()
    message = _refused(_post(proxy, body), 400, "invalid_json")
    assert "deep" in message or "depth" in message
    _serving(proxy)


def _chat_saying(content: bytes) -> bytes:
    """A chat request whose message's JSON string holds ``content`` as it is."""
    return b'{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}' % (
        MODEL.encode(),
        content,
    )


@pytest.mark.parametrize(
    "body",
    [
        _chat_saying(b"\xff\xfe"),
        _chat_saying(b"\\ud800"),
        b"\xef\xbb\xbf{}",
        b"\x00",
    ],
    ids=["invalid-utf8", "lone-surrogate", "bom", "nul"],
)
def test_text_that_is_not_utf8_is_400(proxy: ProxyThread, body: bytes) -> None:
    _refused(_post(proxy, body), 400, "invalid_json")
    _serving(proxy)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", MAX_CHOICES + 1),
        ("n", 10**12),
        ("n", 0),
        ("max_tokens", MAX_ANSWER_TOKENS + 1),
        ("max_tokens", 10**30),
        ("max_tokens", 1e300),
        ("max_tokens", -1),
        ("max_tokens", "5"),
        ("max_completion_tokens", 2**64),
        ("stream", "false"),
        ("seed", 2**70),
        ("seed", -(2**63) - 1),  # orjson makes it the float -2.0**63, which is in range
        ("seed", 2**64),
        ("temperature", True),
    ],
)
def test_out_of_range_and_mistyped_fields_are_400(
    proxy: ProxyThread, field: str, value: object
) -> None:
    message = _refused(_post(proxy, {**CHAT, field: value}), 400, "invalid_request")
    assert message.startswith(f"{field}: ")
    _serving(proxy)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{}]}, "messages.0.role"),
        ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [[]]}, "prompt"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/chat/completions", {}, "messages"),
    ],
)
def test_empty_messages_and_prompts_are_400(
    proxy: ProxyThread, path: str, body: dict[str, Any], field: str
) -> None:
    message = _refused(_post(proxy, body, path), 400, "invalid_request")
    assert field in message
    _serving(proxy)


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"hi"', b"1e999", b"{"])
def test_a_body_that_is_no_json_object_is_400(proxy: ProxyThread, body: bytes) -> None:
    _refused(_post(proxy, body), 400, "invalid_json")
    _serving(proxy)


def test_options_that_are_not_an_object_are_400(proxy: ProxyThread) -> None:
    options: object
    for options in (False, 0, "", [], "cache"):
        message = _refused(_post(proxy, {**CHAT, "leangate": options}), 400, "invalid_request")
        assert message.startswith("leangate")
    _serving(proxy)


def _documents(count: int) -> bytes:
    """``{"documents": [...]}`` of ``count`` one-word documents, built fast."""
    items = b",".join(b'{"id":"d%d","text":"w"}' % i for i in range(count))
    return b'{"documents":[' + items + b"]}"


def test_a_million_document_ingest_is_413_under_the_body_limit(proxy: ProxyThread) -> None:
    response = _post(proxy, _documents(1_000_000), "/v1/corpora/big/documents")
    _refused(response, 413, "request_too_large")
    _serving(proxy)


def test_a_million_document_ingest_is_400_within_the_body_limit(roomy: ProxyThread) -> None:
    response = _post(roomy, _documents(1_000_000), "/v1/corpora/big/documents")
    message = _refused(response, 400, "invalid_request")
    assert "1000000 documents" in message
    listed = httpx.get(roomy.url + "/v1/corpora").json()
    assert listed == {"object": "list", "data": []}
    _serving(roomy)
