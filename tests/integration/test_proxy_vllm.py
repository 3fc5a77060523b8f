"""The proxy in front of the real vLLM server, driven by the official openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import MODEL, ProxyThread, too_long_prompt, vllm_running, wait_for
from openai.types.chat import ChatCompletionMessageParam

pytestmark = pytest.mark.integration

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(proxy: ProxyThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)


def test_models_lists_the_backend_model(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_health_and_metrics(proxy: ProxyThread) -> None:
    health = httpx.get(proxy.url + "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["cache"] == {"store": "memory", "available": True}
    metrics = httpx.get(proxy.url + "/metrics")
    assert metrics.status_code == 200
    assert "leangate_requests_total" in metrics.text
    assert "leangate_backend_replicas_healthy 1.0" in metrics.text


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        max_tokens=12,
        temperature=0,
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens <= 12


def test_stream_matches_non_stream_and_reports_usage(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        max_tokens=16,
        temperature=0,
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=PROMPT,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert len(chunks) > 3, "the answer arrived as several chunks"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    plain = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert plain.choices[0].text
    assert streamed == plain.choices[0].text


def test_n_with_stop(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 10 separated by commas."}],
        n=2,
        stop=[","],
        max_tokens=20,
        temperature=0.8,
        seed=7,
    )
    assert len(answer.choices) == 2
    for choice in answer.choices:
        assert "," not in (choice.message.content or "")


def test_json_schema_and_vllm_extras_pass_through(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick a color. Answer in JSON."}],
        max_tokens=20,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert json.loads(answer.choices[0].message.content or "")["color"] in {"red", "green", "blue"}
    forced = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say OK."}],
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True, "min_tokens": 7},
    )
    assert forced.usage is not None and forced.usage.completion_tokens == 7


def test_logprobs(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content[0].top_logprobs) == 3


def test_error_shapes(proxy: ProxyThread, client: openai.OpenAI, vllm_url: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=PROMPT)
    bad = httpx.post(proxy.url + "/v1/chat/completions", content=b"{not json")
    assert bad.status_code == 400
    assert set(bad.json()["error"]) == {"message", "type", "code"}
    missing = httpx.post(proxy.url + "/v1/chat/completions", json={"model": MODEL})
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]
    # vLLM's own 4xx (prompt longer than the context) comes back unchanged.
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt=too_long_prompt(vllm_url), max_tokens=5)
    assert too_long.value.status_code == 400
    assert "error" in too_long.value.response.json()
    assert httpx.get(proxy.url + "/health").status_code == 200


def test_leangate_field_is_stripped(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        max_tokens=4,
        temperature=0,
        extra_body={"leangate": {"disable": ["cache"]}},
    )
    assert answer.choices[0].message.content is not None


def _outstanding(proxy: ProxyThread, vllm_url: str) -> float:
    line = f'leangate_backend_outstanding{{replica="{vllm_url.rstrip("/")}"}}'
    for row in httpx.get(proxy.url + "/metrics").text.splitlines():
        if row.startswith(line):
            return float(row.split()[-1])
    raise AssertionError(f"{line} is not in /metrics")


def test_outstanding_requests_are_in_metrics_while_a_stream_runs(
    proxy: ProxyThread, vllm_url: str
) -> None:
    body = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": 200,
        "ignore_eos": True,  # long enough to be still running when /metrics is read
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", proxy.url + "/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        next(lines)
        assert _outstanding(proxy, vllm_url) == 1
        for _ in lines:
            pass
    wait_for(lambda: _outstanding(proxy, vllm_url) == 0, 5, "the answered stream is still counted")


def test_client_disconnect_cancels_backend_request(proxy: ProxyThread, vllm_url: str) -> None:
    body = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", proxy.url + "/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        wait_for(lambda: vllm_running(vllm_url) >= 1, 60, "the stream is not generating")
    wait_for(lambda: vllm_running(vllm_url) == 0, 10, "vLLM generates on for a gone client")


def test_requests_and_first_events_are_labelled_by_model_and_bounded_tenant(
    client: openai.OpenAI, proxy: ProxyThread
) -> None:
    """``sk-test`` is a key no tenant lists: a tenant of its own, labelled ``other`` so
    that unknown keys cannot grow the metrics without bound."""
    stream = client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=4, temperature=0, stream=True
    )
    assert list(stream)
    labels = f'model="{MODEL}",route="chat",tenant="other"'
    text = httpx.get(proxy.url + "/metrics").text
    assert f"leangate_first_event_seconds_count{{{labels}}}" in text
    assert (
        f'leangate_requests_total{{model="{MODEL}",route="chat",status="200",tenant="other"}}'
        in text
    )


def test_tokenize_and_detokenize_are_forwarded(proxy: ProxyThread, vllm_url: str) -> None:
    body = {"model": MODEL, "prompt": "Name three colors."}
    via = httpx.post(proxy.url + "/tokenize", json=body, timeout=60)
    direct = httpx.post(vllm_url + "/tokenize", json=body, timeout=60)
    assert via.status_code == 200 and via.json() == direct.json()
    tokens = {"model": MODEL, "tokens": via.json()["tokens"]}
    back = httpx.post(proxy.url + "/detokenize", json=tokens, timeout=60)
    assert back.json()["prompt"] == "Name three colors."


def test_an_endpoint_the_model_does_not_serve_answers_as_vllm_does(
    client: openai.OpenAI, vllm_url: str
) -> None:
    """SmolLM2 is served for generation: vLLM refuses embeddings, and so does the proxy,
    with vLLM's own status and message."""
    direct = httpx.post(vllm_url + "/v1/embeddings", json={"model": MODEL, "input": "a"})
    with pytest.raises(openai.APIStatusError) as refused:
        client.embeddings.create(model=MODEL, input="a")
    assert refused.value.status_code == direct.status_code >= 400
    assert refused.value.response.content == direct.content


def test_the_client_request_id_names_the_request_in_vllm(proxy: ProxyThread) -> None:
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 4, "temperature": 0}
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        json=body,
        headers={"x-request-id": "order-42"},
        timeout=60,
    )
    assert response.headers["x-request-id"] == "order-42"
    assert response.json()["id"].startswith("chatcmpl-order-42-"), "vLLM named it otherwise"
