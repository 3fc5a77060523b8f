"""The SDK against a faked backend: exported names, options, errors as the openai client
raises them through the proxy, streams that end early, and the admin client's errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import openai
import pytest
from conftest import MODEL, ProxyThread, proxy_settings, write_policy
from pydantic import BaseModel, ConfigDict

import leangate
from leangate import Document, Options, Pipeline
from leangate.backend.transport import HttpxTransport
from leangate.middleware.context import RequestContext, Result
from leangate.middleware.pipeline import Handler
from leangate.middleware.services import Services

EXPORTED = [
    "AddedDocuments",
    "AdminClient",
    "AdminError",
    "ChunkStream",
    "CorpusInfo",
    "Document",
    "Health",
    "Options",
    "Pipeline",
    "Policy",
    "PolicyError",
    "QueryHit",
    "RawResponse",
    "SyncChunkStream",
    "SyncPipeline",
    "__version__",
    "check_policy",
]
HI = [{"role": "user", "content": "hi"}]
RECEIVED: list[dict[str, Any]] = []
CLOSED: list[str] = []


class ScopeSpy:
    """Records when a request's scope closes (named in the policy by import string)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    default_budget_ms: ClassVar[float | None] = None

    def __init__(self, name: str, settings: Settings, services: Services) -> None:
        self.name = name

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        ctx.scope.defer(lambda: CLOSED.append("scope"))
        return await call_next(ctx)


POLICY = f"""
rules:
  - name: spied
    stages: [{{use: "{__name__}:ScopeSpy"}}, {{use: cache}}]
"""


def _chunk(text: str) -> bytes:
    event = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


ANSWER = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": MODEL,
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
    ],
}

COMPLETION = {
    "id": "x",
    "object": "text_completion",
    "created": 1,
    "model": MODEL,
    "choices": [{"index": 0, "text": "Hi", "finish_reason": "stop"}],
}


class _Stream(httpx.AsyncByteStream):
    def __init__(self, *chunks: bytes, then: str = "done") -> None:
        self.chunks = chunks
        self.then = then

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.then == "dies":
            raise httpx.ReadError("connection reset by peer")
        while self.then == "endless":
            yield _chunk("and")
            await asyncio.sleep(0.01)
        if self.then == "done":
            yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        CLOSED.append("upstream")


def _error(status: int, message: str) -> httpx.Response:
    error = {"error": {"message": message, "type": "BadRequestError", "code": status}}
    return httpx.Response(status, json=error)


def _backend(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
    body = json.loads(request.content)
    RECEIVED.append(body)
    scenario = body.get("user", "")
    sse = {"content-type": "text/event-stream"}
    if scenario == "refused":
        raise httpx.ConnectError("connection refused")
    if scenario == "slow":
        raise httpx.ReadTimeout("timed out")
    if scenario in ("too-long", "busy"):
        return _error(400 if scenario == "too-long" else 429, scenario)
    if scenario in ("dies", "no-done", "endless"):
        return httpx.Response(200, stream=_Stream(_chunk("Hel"), then=scenario), headers=sse)
    if body.get("stream"):
        return httpx.Response(200, stream=_Stream(_chunk("Hel"), _chunk("lo")), headers=sse)
    if request.url.path == "/v1/completions":
        return httpx.Response(200, json=COMPLETION)
    return httpx.Response(200, json=ANSWER)


class _StreamingMock(httpx.MockTransport):
    """Leaves streams to the client, so that one can fail or be closed half-way."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        if json.loads(request.content or b"{}").get("user") == "sleepy":
            await asyncio.sleep(5)
        response = self.handler(request)
        assert isinstance(response, httpx.Response)
        return response


def _pipeline(policy: str = POLICY, **kwargs: Any) -> Pipeline:
    transport = HttpxTransport(_StreamingMock(_backend))
    return Pipeline("http://backend.test", policy, transport=transport, **kwargs)


@pytest.fixture(scope="module")
async def lg() -> AsyncIterator[Pipeline]:
    async with _pipeline() as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    policy = write_policy(tmp_path_factory.mktemp("sdk"), POLICY)
    settings = proxy_settings("http://backend.test", policy=policy)
    with ProxyThread(settings, HttpxTransport(_StreamingMock(_backend))) as running:
        yield running


# --- surface ---------------------------------------------------------------------------------


def test_exported_names_are_pinned() -> None:
    assert sorted(leangate.__all__) == EXPORTED
    for name in EXPORTED:
        assert getattr(leangate, name) is not None
    with pytest.raises(AttributeError):
        _ = leangate.Nothing


def test_import_stays_cheap() -> None:
    heavy = ("torch", "faiss", "onnxruntime", "openai", "fastapi", "pydantic")
    code = (
        f"import sys, leangate; loaded = [m for m in {heavy!r} if m in sys.modules]; "
        "leangate.Options; leangate.Document; leangate.AdminClient; "
        "late = [m for m in ('torch', 'faiss', 'onnxruntime') if m in sys.modules]; "
        "print(loaded, late)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"


def test_check_policy_reads_text_and_files(tmp_path: Path) -> None:
    assert leangate.check_policy("rules: []").rules == []
    path = write_policy(tmp_path, POLICY)
    assert [s.use for s in leangate.check_policy(path).rules[0].stages][1] == "cache"
    assert leangate.check_policy(str(path)).rules[0].name == "spied"
    with pytest.raises(leangate.PolicyError, match="unknown stage 'nope'"):
        leangate.check_policy("rules:\n  - stages: [{use: nope}]\n")
    with pytest.raises(leangate.PolicyError, match="cannot read"):
        leangate.check_policy(tmp_path / "missing.yaml")


async def test_a_pipeline_must_be_opened() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await _pipeline().chat.completions.create(model=MODEL, messages=HI)


# --- requests and options --------------------------------------------------------------------


async def test_answer_is_the_openai_type_with_the_proxys_headers(lg: Pipeline) -> None:
    raw = await lg.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, temperature=0, seed=1, top_p=openai.NOT_GIVEN
    )
    answer = raw.parse()
    assert isinstance(answer, openai.types.chat.ChatCompletion)
    assert answer.choices[0].message.content == "Hi"
    assert raw.headers["x-leangate-cache"] in {"miss", "hit-exact"}
    assert "cache;dur=" in raw.headers["server-timing"]
    assert "top_p" not in RECEIVED[-1]


async def test_options_are_typed_narrow_the_policy_and_never_reach_the_backend(
    lg: Pipeline,
) -> None:
    options = Options(disable=["cache"], documents=[Document(id="a", text="Some text.")])
    sent = len(RECEIVED)
    for _ in range(2):
        raw = await lg.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "uncached"}], leangate=options
        )
        assert "x-leangate-cache" not in raw.headers
    assert len(RECEIVED) == sent + 2
    assert "leangate" not in RECEIVED[-1]
    raw = await lg.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, leangate={"stages": []}, extra_headers={"X-Test": "1"}
    )
    assert "x-leangate-cache" not in raw.headers


async def test_cache_serves_a_repeat(lg: Pipeline) -> None:
    messages = [{"role": "user", "content": "repeat me"}]
    first = await lg.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0
    )
    assert first.headers["x-leangate-cache"] == "miss"
    await asyncio.sleep(0.1)  # the answer is stored in the background
    sent = len(RECEIVED)
    second = await lg.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0
    )
    assert second.headers["x-leangate-cache"] == "hit-exact"
    assert len(RECEIVED) == sent
    assert second.parse().choices[0].message.content == "Hi"


async def test_legacy_completions(lg: Pipeline) -> None:
    completion = await lg.completions.create(model=MODEL, prompt="Say", max_tokens=2)
    assert isinstance(completion, openai.types.Completion)
    assert completion.choices[0].text == "Hi"


# --- errors: the openai client's, as through the proxy ---------------------------------------

ERROR_CASES: list[tuple[dict[str, Any], type[openai.APIStatusError]]] = [
    ({"messages": []}, openai.BadRequestError),
    ({"max_tokens": "many"}, openai.BadRequestError),
    ({"leangate": {"stages": ["nope"]}}, openai.BadRequestError),
    ({"model": "other-model"}, openai.NotFoundError),
    ({"user": "too-long"}, openai.BadRequestError),
    ({"user": "busy"}, openai.RateLimitError),
    ({"user": "slow"}, openai.InternalServerError),
]


@pytest.mark.parametrize(("fields", "expected"), ERROR_CASES)
async def test_errors_are_those_the_openai_client_raises_through_the_proxy(
    lg: Pipeline,
    proxy: ProxyThread,
    fields: dict[str, Any],
    expected: type[openai.APIStatusError],
) -> None:
    request: dict[str, Any] = {"model": MODEL, "messages": HI, "temperature": 0, **fields}
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    leangate_field = request.pop("leangate", None)
    with pytest.raises(expected) as through_proxy:
        client.chat.completions.create(**request, extra_body={"leangate": leangate_field})
    with pytest.raises(expected) as in_process:
        await lg.chat.completions.create(**request, leangate=leangate_field)
    assert in_process.value.status_code == through_proxy.value.status_code
    assert in_process.value.body == through_proxy.value.body
    assert in_process.value.code == through_proxy.value.code


async def test_unreachable_backend_is_a_server_error() -> None:
    """On a pipeline of its own: a refused connection marks the replica unhealthy."""
    async with _pipeline() as pipeline:
        with pytest.raises(openai.InternalServerError) as refused:
            await pipeline.chat.completions.create(model=MODEL, messages=HI, user="refused")
    assert refused.value.status_code in (502, 503)  # 503: no replica left to retry on


async def test_unknown_key_is_an_authentication_error() -> None:
    policy = "require_api_key: true\ntenants: {acme: {api_keys: [sk-acme]}}\nrules: []\n"
    async with _pipeline(policy, api_key="sk-other") as strict:
        with pytest.raises(openai.AuthenticationError):
            await strict.chat.completions.create(model=MODEL, messages=HI)
        answer = await strict.chat.completions.create(
            model=MODEL, messages=HI, extra_headers={"Authorization": "Bearer sk-acme"}
        )
        assert answer.choices[0].message.content == "Hi"


async def test_timeout_is_the_openai_timeout(lg: Pipeline) -> None:
    with pytest.raises(openai.APITimeoutError):
        await lg.chat.completions.create(model=MODEL, messages=HI, user="sleepy", timeout=0.2)


# --- streams ---------------------------------------------------------------------------------


async def test_stream_yields_chunks(lg: Pipeline) -> None:
    stream = await lg.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream"}], stream=True, temperature=0
    )
    chunks = [chunk async for chunk in stream]
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
    assert stream.headers["x-leangate-cache"] == "miss"
    assert stream.closed


async def test_closing_a_stream_early_frees_the_backend_and_the_scope(lg: Pipeline) -> None:
    CLOSED.clear()
    stream = await lg.chat.completions.create(model=MODEL, messages=HI, stream=True, user="endless")
    async with stream:
        async for chunk in stream:
            assert chunk.choices[0].delta.content == "Hel"
            break
        assert CLOSED == []
    assert set(CLOSED) == {"upstream", "scope"}
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_closing_the_pipeline_closes_its_open_streams() -> None:
    CLOSED.clear()
    async with _pipeline() as pipeline:
        stream = await pipeline.chat.completions.create(
            model=MODEL, messages=HI, stream=True, user="endless"
        )
        assert CLOSED == []
    assert stream.closed
    assert set(CLOSED) == {"upstream", "scope"}


@pytest.mark.parametrize("scenario", ["dies", "no-done"])
async def test_a_stream_cut_short_raises_the_error_event(lg: Pipeline, scenario: str) -> None:
    before = lg.metrics.stream_errors.labels("chat")._value.get()
    stream = await lg.chat.completions.create(model=MODEL, messages=HI, stream=True, user=scenario)
    received = []
    with pytest.raises(openai.APIError) as failed:
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 1
    assert isinstance(failed.value.body, dict) and failed.value.body["type"] == "bad_gateway"
    assert lg.metrics.stream_errors.labels("chat")._value.get() == before + 1
    assert stream.closed


# --- the admin client's errors ---------------------------------------------------------------


def _proxy_refusing(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/admin/cache/purge":
        assert request.headers["authorization"] == "Bearer admin-key"
        error = {"message": "disabled", "type": "permission_error", "code": "permission_error"}
        return httpx.Response(403, json={"error": error})
    error = {"message": "no such corpus", "type": "not_found", "code": "corpus_not_found"}
    return httpx.Response(404, json={"error": error})


def test_admin_errors_carry_status_and_message() -> None:
    fake = httpx.MockTransport(_proxy_refusing)
    with leangate.AdminClient("http://proxy.test", admin_key="admin-key", transport=fake) as admin:
        with pytest.raises(leangate.AdminError) as missing:
            admin.drop_corpus("handbook")
        assert (missing.value.status, missing.value.code) == (404, "corpus_not_found")
        assert missing.value.message == "no such corpus"
        with pytest.raises(leangate.AdminError) as refused:
            admin.purge_cache(tenant="acme")
        assert (refused.value.status, refused.value.type) == (403, "permission_error")
    with (
        leangate.AdminClient("http://127.0.0.1:9", timeout=2) as unreachable,
        pytest.raises(leangate.AdminError) as gone,
    ):
        unreachable.list_corpora()
    assert gone.value.status is None
