"""The stage platform against the real vLLM server: fan-out overlap, cancellation of every
sub-request when the client leaves, the worked example stage, tokenizer and profile."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import (
    MODEL,
    ProxyThread,
    posted_then_left,
    proxy_settings,
    vllm_running,
    wait_for,
    write_policy,
)
from openai.types.chat import ChatCompletionMessageParam

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.localvllm import LocalVLLMConfig
from leangate.backend.profile import BackendProfile, timed_request
from leangate.backend.tokenizer import Tokenizer
from leangate.bench.profile import FANOUT_HEADER, probe_bodies

pytestmark = pytest.mark.integration

FANOUT = """
rules:
  - name: fanout
    stages:
      - use: "leangate.bench.profile:FanoutProbe"
        settings: {count: 8, max_tokens: %d}
"""
EXAMPLE = """
rules:
  - name: example
    stages: [{use: example-fanout, settings: {part_tokens: 24}}]
"""


def test_eight_sub_requests_overlap(vllm_url: str, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, FANOUT % 16)
    request = {"model": MODEL, "messages": [{"role": "user", "content": "go"}]}
    with (
        ProxyThread(proxy_settings(vllm_url, policy=policy)) as proxy,
        httpx.Client(timeout=300) as http,
    ):
        http.post(f"{proxy.url}/v1/chat/completions", json=request).raise_for_status()  # warm
        response = http.post(f"{proxy.url}/v1/chat/completions", json=request)
        response.raise_for_status()
        timing = json.loads(response.headers[FANOUT_HEADER])
        assert response.json()["usage"]["completion_tokens"] == 8 * 16
        sequential = 0.0
        for body in probe_bodies(MODEL, 8, 16):
            started = time.perf_counter()
            http.post(f"{vllm_url}/v1/chat/completions", json=body).raise_for_status()
            sequential += time.perf_counter() - started
    wall, longest = timing["wall_s"], max(timing["each_s"])
    assert wall <= 1.3 * longest, f"a sub-request waited for another: {timing}"
    assert sequential >= 2 * wall, f"8 at once took {wall:.2f}s, one by one {sequential:.2f}s"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_cancels_every_sub_request(
    vllm_url: str, tmp_path: Path, stream: bool
) -> None:
    wait_for(lambda: vllm_running(vllm_url) == 0, 60, "vLLM is busy with another test's requests")
    policy = write_policy(tmp_path, FANOUT % 1500)
    request = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": stream}
    with ProxyThread(proxy_settings(vllm_url, policy=policy)) as proxy:
        with httpx.Client(timeout=300) as http:
            if stream:
                with http.stream("POST", f"{proxy.url}/v1/chat/completions", json=request) as r:
                    lines = r.iter_lines()  # kept: a dropped iterator closes the stream
                    assert next(lines).startswith("data: ")  # the first part is flowing
                    wait_for(lambda: vllm_running(vllm_url) == 8, 120, "not all 8 ran")
            else:
                with posted_then_left(f"{proxy.url}/v1/chat/completions", request):
                    wait_for(lambda: vllm_running(vllm_url) == 8, 120, "not all 8 ran")
        wait_for(lambda: vllm_running(vllm_url) == 0, 10, "sub-requests run on for a gone client")


def test_example_stage_streams_both_parts_with_summed_usage(vllm_url: str, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, EXAMPLE)
    with ProxyThread(proxy_settings(vllm_url, policy=policy)) as proxy:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-test")
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "Why do leaves change colour in autumn?"}
        ]
        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        plain = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
        )
    brief, _, example = text.partition("\n\nFor example: ")
    assert brief.strip() and example.strip(), text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 24, "both parts counted"
    assert plain.choices[0].message.content is not None
    assert "For example: " in plain.choices[0].message.content
    assert plain.usage is not None and plain.usage.prompt_tokens > 0


async def test_tokenizer_counts_like_vllm(vllm_url: str) -> None:
    client = BackendClient(BackendSettings(urls=[vllm_url], load_poll_s=0))
    await client.start()
    try:
        text = "Leangate counts tokens: 12,345 apples, naïve cafés, and `code()`."
        remote = Tokenizer(client)
        exact = await remote.count(MODEL, text=text)
        assert exact > 10
        assert abs(remote.estimate(MODEL, text) - exact) <= max(2, exact // 5)
        model_dir = LocalVLLMConfig().model_dir
        if (model_dir / "tokenizer.json").is_file():
            local = Tokenizer(client, {MODEL: model_dir})
            assert local.estimate(MODEL, text) == exact
        chat = await remote.count(MODEL, messages=[{"role": "user", "content": text}])
        assert chat > exact, "the chat template adds its role markers"
    finally:
        await client.aclose()


async def test_calibrated_profile_predicts_a_direct_request(vllm_url: str) -> None:
    client = BackendClient(BackendSettings(urls=[vllm_url], load_poll_s=0))
    await client.start()
    try:
        profile = BackendProfile()
        await profile.calibrate(client, MODEL, quick=True)
        e = profile.estimate
        assert e.step_s(8) < 8 * e.step_s(1), "batching was measured to pay"
        sample = await timed_request(client, MODEL, "Describe a quiet harbour at dawn.", 32)
        predicted = profile.predict(sample.prompt_tokens, 32, load=0)
        assert abs(predicted - sample.total_s) <= 0.6 * sample.total_s
    finally:
        await client.aclose()


async def test_the_profile_learns_the_load_from_vllm_metrics(vllm_url: str) -> None:
    client = BackendClient(BackendSettings(urls=[vllm_url], load_poll_s=0.2))
    await client.start()
    try:
        busy = [
            asyncio.create_task(timed_request(client, MODEL, f"Story {i}.", 200)) for i in range(3)
        ]
        deadline = time.monotonic() + 20
        while client.profile.reported_load < 3 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert client.profile.reported_load >= 3
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
    finally:
        await client.aclose()
