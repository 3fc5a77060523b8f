"""The ``compress`` stage on conversations, against the real vLLM server: old turns
summarized once (by the model, then reused), sent byte for byte by every later request so
vLLM's prefix cache keeps hitting, and ``keep_messages``."""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from compress_corpus import INSTRUCTION, document, more_sections
from conftest import MODEL, ProxyThread, proxy_settings, vllm_running, wait_for, write_policy
from recording_backend import RecordingTransport as ChatRecorder

from leangate.bench.common import header_fields, metric_total
from leangate.retrieval.compress import HEADER
from leangate.retrieval.summarize import SUMMARY_INSTRUCTIONS, SUMMARY_PREFIX

pytestmark = pytest.mark.integration

POLICY = """
rules:
  - name: compress
    stages:
      - use: compress
        budget_ms: 30000
        settings: {mode: always, min_prompt_tokens: 200, min_turn_tokens: 60, %s}
"""
SECTIONS = more_sections(40)
Messages = list[dict[str, Any]]


class RecordingTransport(ChatRecorder):
    """What the proxy sends to vLLM, told apart: summaries and prompts."""

    def summaries(self) -> list[dict[str, Any]]:
        return [b for b in self.bodies if _is_summary(b)]

    def prompts(self) -> list[Messages]:
        return [b["messages"] for b in self.bodies if not _is_summary(b)]


def _is_summary(body: dict[str, Any]) -> bool:
    return str(body["messages"][0]["content"]).startswith(SUMMARY_INSTRUCTIONS[:30])


def _proxy(vllm_url: str, folder: Path, settings: str) -> Iterator[tuple[ProxyThread, Any]]:
    transport = RecordingTransport()
    policy = write_policy(folder, POLICY % settings)
    with ProxyThread(proxy_settings(vllm_url, policy=policy), transport=transport) as running:
        yield running, transport


@pytest.fixture(scope="module")
def by_model(vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("conversation-llm")
    yield from _proxy(vllm_url, folder, "summarizer: llm, keep_recent_turns: 0")


@pytest.fixture(scope="module")
def extractive(vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("conversation")
    yield from _proxy(vllm_url, folder, "keep_recent_turns: 0")


def _turn(tag: str, number: int) -> str:
    sections = SECTIONS[number * 4 : number * 4 + 4]
    return (
        f"{INSTRUCTION} (notes {tag}-{number})\n\n{document(sections)}\n\n"
        f"Question: Where did {sections[0][0]} ship to?"
    )


def _answer(number: int) -> str:
    """A long earlier answer, written here (no numbers: the model's summary of it is less
    likely to be refused)."""
    towns = ("Ardwell", "Brisk", "Coldharbour", "Dunmere")
    return " ".join(
        f"The works at {town} shipped rope and wool along the coast, and the harbour there "
        f"kept its boats through the winter storms of that decade."
        for town in towns[number % 4 :] + towns[: number % 4]
    )


def _ask(url: str, messages: Messages, key: str, **options: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 4,
        "temperature": 0,
    }
    if options:
        body["leangate"] = options
    headers = {"authorization": f"Bearer {key}"}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600)
    response.raise_for_status()
    return response


def _block_tokens(vllm_url: str) -> int:
    """vLLM's KV-cache block size: its prefix cache reuses whole blocks only."""
    text = httpx.get(f"{vllm_url}/metrics", timeout=10).text
    found = re.search(r'vllm:cache_config_info\{[^}]*\bblock_size="(\d+)"', text)
    assert found, "vLLM's /metrics has no cache_config_info"
    return int(found.group(1))


def _prompt_tokens(response: httpx.Response) -> int:
    return int(response.json()["usage"]["prompt_tokens"])


def _fields(response: httpx.Response) -> dict[str, str]:
    return header_fields(response.headers[HEADER])


def test_old_turns_are_summarized_once_and_sent_again_byte_for_byte(
    by_model: tuple[ProxyThread, RecordingTransport], vllm_url: str
) -> None:
    """A conversation the proxy never saw: its four old turns are summarized by the model
    (one sub-request each, all at once); the next requests make a summary only for the
    newest answer and send every earlier message exactly as before, so vLLM's prefix cache
    holds what they repeat (its own counter)."""
    proxy, transport = by_model
    tag, key = uuid.uuid4().hex[:10], f"test-{uuid.uuid4().hex}"
    messages: Messages = [{"role": "system", "content": f"You are terse. Chat {tag}."}]
    for number in range(2):
        messages += [
            {"role": "user", "content": _turn(tag, number)},
            {"role": "assistant", "content": _answer(number)},
        ]
    messages.append({"role": "user", "content": _turn(tag, 2)})
    first_response = _ask(proxy.url, messages, key)
    first = _fields(first_response)
    assert len(transport.summaries()) == 4, "one model call per old turn"
    assert int(first["summaries_llm"]) + int(first["summaries_fallback"]) == 4
    assert int(first["summaries_llm"]) >= 1, first
    sent = transport.prompts()[-1]
    assert any(m["content"].find(SUMMARY_PREFIX) >= 0 for m in sent[1:-1])
    block, before = _block_tokens(vllm_url), _prompt_tokens(first_response)

    for number in (2, 3):
        messages += [
            {"role": "assistant", "content": _answer(number)},
            {"role": "user", "content": _turn(tag, number + 1)},
        ]
        calls = len(transport.summaries())
        hits = metric_total(vllm_url, "vllm:prefix_cache_hits_total")
        response = _ask(proxy.url, messages, key)
        reused = metric_total(vllm_url, "vllm:prefix_cache_hits_total") - hits
        fields = _fields(response)
        assert len(transport.summaries()) == calls + 1, "only the newest answer is new"
        assert (fields["summaries_new"], fields["summaries_reused"]) == ("1", str(2 * number + 1))
        previous, sent = sent, transport.prompts()[-1]
        assert sent[: len(previous)] == previous, "the request before is the prefix"
        assert reused >= before // block * block > 0, (reused, before)
        before = _prompt_tokens(response)


def test_an_extractive_conversation_keeps_the_prefix_vllm_cached(
    extractive: tuple[ProxyThread, RecordingTransport], vllm_url: str
) -> None:
    """vLLM's own prefix-cache counter sees each request reuse every whole KV-cache block
    of the one before (128 tokens on the CPU server: the last partial block is computed
    again). An earlier test's sequences still decoding could evict these short prompts'
    blocks, so the test starts once vLLM is idle."""
    proxy, transport = extractive
    wait_for(lambda: vllm_running(vllm_url) == 0, 120, "vLLM still busy with an earlier test")
    tag, key = uuid.uuid4().hex[:10], f"test-{uuid.uuid4().hex}"
    history: Messages = [{"role": "system", "content": f"You are terse. Chat {tag}."}]
    block, before, reuse = _block_tokens(vllm_url), 0, []
    for number in range(4):
        messages = [*history, {"role": "user", "content": _turn(tag, number)}]
        hits = metric_total(vllm_url, "vllm:prefix_cache_hits_total")
        response = _ask(proxy.url, messages, key)
        reused = metric_total(vllm_url, "vllm:prefix_cache_hits_total") - hits
        reuse.append((reused, before // block * block))
        before = _prompt_tokens(response)
        history = [*messages, {"role": "assistant", "content": _answer(number)}]
    prompts = transport.prompts()[-4:]
    for earlier, after in itertools.pairwise(prompts):
        assert after[: len(earlier)] == earlier
    assert not transport.summaries(), "extractive summaries need no backend call"
    assert all(got >= whole_blocks for got, whole_blocks in reuse), reuse
    assert reuse[-1][1] > 0, "the conversation never grew past one block"


def test_kept_messages_reach_vllm_byte_identical(
    extractive: tuple[ProxyThread, RecordingTransport],
) -> None:
    proxy, transport = extractive
    tag, key = uuid.uuid4().hex[:10], f"test-{uuid.uuid4().hex}"
    messages: Messages = [{"role": "system", "content": "You are terse."}]
    for number in range(2):
        messages += [
            {"role": "user", "content": _turn(tag, number)},
            {"role": "assistant", "content": _answer(number)},
        ]
    messages.append({"role": "user", "content": _turn(tag, 2)})
    response = _ask(proxy.url, messages, key, keep_messages=[1, 4, 5])
    assert response.headers[HEADER].startswith("compressed;")
    sent = transport.prompts()[-1]
    for index in (1, 4, 5):
        assert sent[index] == messages[index]
    assert sent[3]["content"] != messages[3]["content"], "the others are summarized"
    assert sent[2]["content"] != messages[2]["content"]
