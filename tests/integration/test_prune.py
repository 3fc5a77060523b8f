"""The ``prune`` stage (token-level pruning by self-information) against the real vLLM
server, scoring with the served model's own ``prompt_logprobs``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from compress_corpus import INSTRUCTION, QUESTION, long_prompt
from conftest import MODEL, ProxyThread, proxy_settings, write_policy
from recording_backend import RecordingTransport

from leangate.bench.common import header_fields
from leangate.retrieval.prune import HEADER

pytestmark = pytest.mark.integration

POLICY = """
rules:
  - name: forced
    match: {tenants: [forced]}
    stages:
      - {use: prune, budget_ms: 30000, settings: {mode: always, share: 0.3, min_prompt_tokens: 300}}
  - name: auto
    stages: [{use: prune, budget_ms: 30000, settings: {min_prompt_tokens: 300}}]
tenants:
  forced: {api_keys: [sk-forced]}
"""


@pytest.fixture(scope="module")
def pruning(vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    policy = write_policy(tmp_path_factory.mktemp("prune"), POLICY)
    with ProxyThread(proxy_settings(vllm_url, policy=policy)) as running:
        yield running


def _ask(url: str, text: str, key: str) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "temperature": 0,
    }
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300)


def test_forced_pruning_drops_words_but_not_numbers_instruction_or_question(
    pruning: ProxyThread, vllm_url: str
) -> None:
    text = long_prompt(extra=6)
    direct = _ask(vllm_url, text, "none")
    pruned = _ask(pruning.url, text, "sk-forced")
    pruned.raise_for_status()
    header = pruned.headers[HEADER]
    assert header.startswith("pruned; reason=policy-always;"), header
    fields = header_fields(header)
    assert fields["scorer"] == MODEL and int(fields["dropped"]) > 0
    sent = direct.json()["usage"]["prompt_tokens"] / pruned.json()["usage"]["prompt_tokens"]
    assert 1.15 <= sent <= 1.6, sent  # 0.3 of the pasted sentences' tokens, by vLLM's count
    assert int(fields["tokens_after"]) < int(fields["tokens_before"])


def test_what_pruning_must_keep_reaches_the_backend(vllm_url: str, tmp_path: Path) -> None:
    """What the proxy sends: the instruction, the question and every number whole, and
    words only dropped, the rest in order."""
    transport = RecordingTransport()
    policy = write_policy(tmp_path, POLICY)
    text = long_prompt(extra=6)
    with ProxyThread(proxy_settings(vllm_url, policy=policy), transport=transport) as proxy:
        _ask(proxy.url, text, "sk-forced").raise_for_status()
    # (the backend profile's calibration probes are recorded too)
    (sent,) = [
        m[0]["content"]
        for b in transport.bodies
        if (m := b["messages"])[0]["role"] == "user" and m[0]["content"].startswith(INSTRUCTION)
    ]
    assert sent.startswith(INSTRUCTION) and sent.rstrip().endswith(QUESTION)
    assert re.findall(r"\d+", sent) == re.findall(r"\d+", text)
    assert len(sent) < 0.9 * len(text)
    rest = iter(text)
    assert all(char in rest for char in sent), "text only dropped, never changed or moved"


def test_scoring_with_the_served_model_itself_never_pays(pruning: ProxyThread) -> None:
    answer = _ask(pruning.url, long_prompt(extra=6), "sk-other")
    answer.raise_for_status()
    assert answer.headers[HEADER].startswith("skipped; reason=scorer-not-cheaper;")
