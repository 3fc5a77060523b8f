"""The ``compress`` stage against the real vLLM server."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from compress_corpus import INSTRUCTION, QUESTION, long_prompt, prompt
from conftest import MODEL, ProxyThread, proxy_settings, too_long_prompt, write_policy

from leangate.bench.common import metric_total
from leangate.retrieval.compress import HEADER

pytestmark = pytest.mark.integration

POLICY = """
rules:
  - name: compress
    stages:
      - use: compress
        budget_ms: 30000
        settings: {mode: always, ratio: %s, min_prompt_tokens: 300}
"""


@pytest.fixture(scope="module")
def compressing(vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    policy = write_policy(tmp_path_factory.mktemp("compress"), POLICY % 3.0)
    with ProxyThread(proxy_settings(vllm_url, policy=policy)) as running:
        yield running


def _ask(url: str, messages: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def test_the_ratio_is_honoured_on_the_backend(compressing: ProxyThread, vllm_url: str) -> None:
    messages = [{"role": "user", "content": long_prompt()}]
    compressed = _ask(compressing.url, messages)
    direct = _ask(vllm_url, messages)
    compressed.raise_for_status()
    fields = dict(p.split("=") for p in compressed.headers[HEADER].split("; ")[1:])
    assert fields["method"] == "bm25+hop"
    # vLLM's own count of the prompt it received, against the uncompressed one
    ratio = direct.json()["usage"]["prompt_tokens"] / compressed.json()["usage"]["prompt_tokens"]
    assert 2.6 <= ratio <= 3.4, ratio
    assert metric_total(compressing.url, "leangate_compress_tokens_total") > 0


def test_a_short_prompt_is_skipped(compressing: ProxyThread) -> None:
    response = _ask(compressing.url, [{"role": "user", "content": "Name a color."}])
    response.raise_for_status()
    assert response.headers[HEADER].startswith("skipped; reason=short;")


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt(repeat=4)}]}]},
        {
            "messages": [
                {"role": "user", "content": prompt(repeat=4)},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "Castleby"},
            ]
        },
    ],
    ids=["empty-messages", "content-parts", "tool-calls"],
)
def test_bad_input_passes_through_untouched(
    compressing: ProxyThread, proxy: ProxyThread, body: dict[str, Any]
) -> None:
    """As a proxy without the stage answers it (``proxy`` runs none)."""
    through = _ask(compressing.url, **body)
    plain = _ask(proxy.url, **body)
    assert through.status_code == plain.status_code
    assert HEADER not in through.headers
    if plain.status_code == 200:
        assert through.json()["usage"] == plain.json()["usage"]
        assert through.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_a_prompt_over_the_context_window_passes_through(
    compressing: ProxyThread, proxy: ProxyThread, vllm_url: str
) -> None:
    messages = [{"role": "user", "content": too_long_prompt(vllm_url)}]
    through = _ask(compressing.url, messages)
    plain = _ask(proxy.url, messages)
    assert through.status_code == plain.status_code == 400
    assert through.json() == plain.json()
    skipped = metric_total(compressing.url, "leangate_compress_decisions_total")
    assert skipped >= 1 and "over-context" in httpx.get(f"{compressing.url}/metrics").text


def test_the_same_document_asked_again_keeps_the_prefix_vllm_cached(
    compressing: ProxyThread, vllm_url: str
) -> None:
    """A new question about a document sent before: its earlier compressed text comes
    first again, so vLLM's prefix cache holds most of the prompt (its own counter)."""
    tag = uuid.uuid4().hex[:12]
    document = long_prompt().replace(INSTRUCTION, f"{INSTRUCTION} Reference {tag}.", 1)
    first = _ask(compressing.url, [{"role": "user", "content": document}])
    first.raise_for_status()
    hits = metric_total(vllm_url, "vllm:prefix_cache_hits_total")
    other = document.replace(QUESTION, "When did the Harwick museum open?")
    second = _ask(compressing.url, [{"role": "user", "content": other}])
    second.raise_for_status()
    reused = metric_total(vllm_url, "vllm:prefix_cache_hits_total") - hits
    assert "stable" in second.headers[HEADER]
    assert reused >= 0.7 * first.json()["usage"]["prompt_tokens"], reused
