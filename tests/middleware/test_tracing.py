"""OpenTelemetry spans: a request, its stages and its backend calls, as a tree, with no
prompt text; the fake backend answers at once."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from conftest import MODEL, ProxyThread, proxy_settings, write_policy
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from leangate.backend.transport import HttpxTransport
from leangate.middleware.tracing import Tracing

POLICY = """
rules:
  - name: cached
    stages: [{use: cache}]
"""
QUESTION = "What is the secret word in this prompt? Swordfish."


def _backend(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
    message = {"role": "assistant", "content": "I cannot say."}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    answer = {"object": "chat.completion", "model": MODEL, "choices": [choice]}
    assert json.loads(request.content)["messages"][0]["content"] == QUESTION
    return httpx.Response(200, json=answer)


def test_a_request_its_stage_and_its_backend_call_are_one_tree(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    settings = proxy_settings("http://backend.test", policy=write_policy(tmp_path, POLICY))
    transport = HttpxTransport(httpx.MockTransport(_backend))
    messages = [{"role": "user", "content": QUESTION}]
    body = {"model": MODEL, "messages": messages, "temperature": 0}
    with ProxyThread(settings, transport, Tracing.start(exporter)) as proxy:
        for _ in range(2):  # a miss, then a hit that never reaches the backend
            httpx.post(f"{proxy.url}/v1/chat/completions", json=body).raise_for_status()
    spans = exporter.get_finished_spans()
    names = sorted(s.name for s in spans)
    assert names == ["leangate.backend"] + ["leangate.request"] * 2 + ["leangate.stage"] * 2
    by_id = {s.context.span_id: s for s in spans}
    backend = next(s for s in spans if s.name == "leangate.backend")
    assert backend.parent is not None
    stage = by_id[backend.parent.span_id]
    assert stage.name == "leangate.stage"
    assert dict(stage.attributes or {})["leangate.stage"] == "cache"
    assert stage.parent is not None
    request = by_id[stage.parent.span_id]
    labels = dict(request.attributes or {})
    assert labels["leangate.model"] == MODEL and labels["leangate.tenant"] == "anonymous"
    everything = repr([(s.name, dict(s.attributes or {}), s.events) for s in spans])
    assert "Swordfish" not in everything and "cannot say" not in everything
