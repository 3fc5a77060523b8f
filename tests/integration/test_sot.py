"""The ``sot`` stage against the real vLLM server."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import MODEL, ProxyThread, proxy_settings, vllm_running, wait_for, write_policy

from leangate.bench.common import metric_total
from leangate.planners.sot import PLAN_HEADER

pytestmark = pytest.mark.integration

POLICY = """
rules:
  - name: sot
    stages: [{use: sot, settings: {mode: %s, skeleton_tokens: %d}}]
"""
QUESTION = "What are some good ways to keep a small apartment tidy?"


def _proxy(vllm_url: str, tmp_path: Path, mode: str, skeleton_tokens: int = 64) -> ProxyThread:
    policy = write_policy(tmp_path, POLICY % (mode, skeleton_tokens))
    return ProxyThread(proxy_settings(vllm_url, policy=policy))


def _body(question: str = QUESTION, **extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 120,
        "temperature": 0,
        **extra,
    }


def test_outline_then_points_with_summed_usage(vllm_url: str, tmp_path: Path) -> None:
    """With a client's request id, which every backend call carries with a suffix of its
    own (vLLM refuses two running requests of one id)."""
    with _proxy(vllm_url, tmp_path, "always") as proxy:
        response = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json=_body(),
            headers={"x-request-id": "sot-test"},
            timeout=300,
        )
    response.raise_for_status()
    plan = response.headers[PLAN_HEADER]
    assert plan.startswith("sot; reason=policy-always; points=")
    points = int(plan.split("points=")[1].split(";")[0])
    assert f"calls={points + 1}; actual_s=" in plan
    text = response.json()["choices"][0]["message"]["content"]
    sections = text.split("\n\n")
    assert len(sections) == points, text
    for index, section in enumerate(sections, 1):
        assert section.startswith(f"{index}. ")
        body = section.split(": ", 1)[1]
        assert len(body.split()) >= 5, f"point {index} was not expanded: {text}"
    usage = response.json()["usage"]
    # the outline and every point: at least points + 1 calls' prompts
    assert usage["prompt_tokens"] > (points + 1) * 40
    assert usage["completion_tokens"] > points


def test_points_stream_in_order_and_overlap(vllm_url: str, tmp_path: Path) -> None:
    wait_for(lambda: vllm_running(vllm_url) == 0, 120, "vLLM still busy with an earlier test")
    body = _body(stream=True)
    with (
        _proxy(vllm_url, tmp_path, "always") as proxy,
        _peak_running(vllm_url) as peak,
        httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=300) as r,
    ):
        plan = r.headers[PLAN_HEADER]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
        failures = _failed_open(proxy.url)
    assert plan == "sot; reason=policy-always"
    assert not failures, f"SoT fell back to a direct answer: {failures}"
    chunks = [orjson.loads(event)["choices"] for event in events]
    text = "".join(choice[0]["delta"].get("content") or "" for choice in chunks if choice)
    positions = [text.find(f"{i}. ") for i in range(1, 5)]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), text
    assert peak[0] >= 3, "the points were not generated at the same time"


def _failed_open(proxy_url: str) -> list[str]:
    """The proxy's stages that failed open so far, with their reasons (metric samples)."""
    text = httpx.get(f"{proxy_url}/metrics", timeout=10).text
    name = "leangate_stage_failed_open_total"
    return [
        line
        for line in text.splitlines()
        if line.startswith(name) and float(line.rsplit(" ", 1)[1]) > 0
    ]


@contextlib.contextmanager
def _peak_running(vllm_url: str) -> Iterator[list[float]]:
    """The most sequences vLLM ran at once while the block ran, polled every 50 ms (a
    sample taken per streamed chunk can miss points that ran while others were buffered)."""
    peak = [0.0]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], vllm_running(vllm_url))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        yield peak
    finally:
        done.set()
        poller.join()


def test_an_outline_that_does_not_parse_answers_directly(vllm_url: str, tmp_path: Path) -> None:
    with _proxy(vllm_url, tmp_path, "always", skeleton_tokens=16) as proxy:
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=_body(), timeout=300)
        failed = metric_total(proxy.url, "leangate_stage_failed_open_total")
    response.raise_for_status()
    assert failed == 1
    direct = httpx.post(f"{vllm_url}/v1/chat/completions", json=_body(), timeout=300).json()
    content = response.json()["choices"][0]["message"]["content"]
    assert content == direct["choices"][0]["message"]["content"]


def test_the_router_sends_arithmetic_straight_on(vllm_url: str, tmp_path: Path) -> None:
    with _proxy(vllm_url, tmp_path, "auto") as proxy:
        body = _body("What is 12 times 7? Answer with the number.", max_tokens=8)
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    assert response.headers[PLAN_HEADER] == "direct; reason=router"


def test_a_client_that_leaves_stops_every_point(vllm_url: str, tmp_path: Path) -> None:
    wait_for(lambda: vllm_running(vllm_url) == 0, 120, "vLLM still busy with an earlier test")
    with _proxy(vllm_url, tmp_path, "always") as proxy, httpx.Client(timeout=300) as http:
        body = _body(max_tokens=1200, stream=True)
        with http.stream("POST", f"{proxy.url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            wait_for(lambda: vllm_running(vllm_url) >= 3, 120, "the points never ran together")
            before = _outcomes(proxy.url)
        wait_for(lambda: _outcomes(proxy.url)["cancelled"] >= 2, 60, "none cancelled")
        wait_for(lambda: vllm_running(vllm_url) == 0, 120, "vLLM never went idle")
        after = _outcomes(proxy.url)
    # Counted by the proxy, not by vLLM, which other clients (another proxy's profile
    # calibration) may be using. A point may end by itself in the moment the proxy takes
    # to notice; none runs on.
    finished = after["ok"] - before["ok"]
    assert finished <= 1, f"{finished:.0f} points ran to their end for a gone client"


def _outcomes(proxy_url: str) -> dict[str, float]:
    """The proxy's sub-requests that ended ``ok`` and that were ``cancelled``."""
    return {
        outcome: metric_total(proxy_url, "leangate_subrequests_total", outcome=outcome)
        for outcome in ("ok", "cancelled")
    }


def test_the_answer_starts_while_the_outline_is_still_written(
    vllm_url: str, tmp_path: Path
) -> None:
    with _proxy(vllm_url, tmp_path, "always") as proxy, httpx.Client(timeout=300) as http:
        body = _body(stream=True)
        with http.stream("POST", f"{proxy.url}/v1/chat/completions", json=body) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: {"))
            first = orjson.loads(next(lines)[6:])["choices"][0]["delta"]["content"]
            finished = metric_total(proxy.url, "leangate_subrequests_total")
            rest = "".join(
                orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                for line in lines
                if '"choices":[{' in line
            )
    assert first.startswith("1")
    assert finished == 0, "the first words waited for a finished outline or point"
    assert "\n\n2. " in first + rest
