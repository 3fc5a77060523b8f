"""The ``rag`` stage against the real vLLM server: attached documents, citations, the
result cache keyed by the documents, and bad input."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import MODEL, ProxyThread, proxy_settings, write_policy

from leangate.bench.common import metric_total
from leangate.retrieval.rag import CITATIONS_HEADER, HEADER

pytestmark = pytest.mark.integration

POLICY = """
rules:
  - name: rag
    stages:
      - use: cache
      - use: rag
        settings: {ratio: 4}
"""
FILLER: list[dict[str, Any]] = [
    {
        "id": f"market-{n}",
        "text": " ".join(
            f"The {kind} market of Tessaro {n} sells {item} on {day}s."
            for kind, item, day in (
                ("morning", "bread", "Monday"),
                ("evening", "fish", "Tuesday"),
                ("weekend", "cheese", "Saturday"),
                ("winter", "wool", "Sunday"),
            )
        ),
        "metadata": {"title": f"Tessaro {n}"},
    }
    for n in range(8)
]
GOLD: dict[str, Any] = {
    "id": "lighthouse",
    "text": "The Quillon Lighthouse was painted green in 1931 by the keeper Ansel Moro.",
    "metadata": {"title": "Quillon Lighthouse"},
}
QUESTION = "What colour was the Quillon Lighthouse painted in 1931? Answer in one word."


@pytest.fixture(scope="module")
def rag_proxy(vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    policy = write_policy(tmp_path_factory.mktemp("rag"), POLICY)
    with ProxyThread(proxy_settings(vllm_url, policy=policy)) as running:
        yield running


def _ask(url: str, documents: list[dict[str, Any]], **options: Any) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
        "leangate": {"documents": documents, **options},
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def test_selected_context_reaches_vllm_and_is_cited(rag_proxy: ProxyThread, vllm_url: str) -> None:
    documents = [*FILLER[:4], GOLD, *FILLER[4:]]
    response = _ask(rag_proxy.url, documents, citations=True)
    response.raise_for_status()
    body = response.json()
    assert "lighthouse#0" in response.headers[CITATIONS_HEADER].split(", ")
    assert [c["id"] for c in body["leangate"]["citations"]] == response.headers[
        CITATIONS_HEADER
    ].split(", ")
    fields = dict(p.split("=") for p in response.headers[HEADER].split("; ")[1:])
    assert int(fields["tokens_before"]) >= 3.5 * int(fields["tokens_after"])
    # vLLM's own counts: what it received is far shorter than all nine documents
    everything = "\n\n".join(d["text"] for d in documents) + "\n\n" + QUESTION
    full = httpx.post(
        f"{vllm_url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": everything}],
            "max_tokens": 1,
        },
        timeout=300,
    ).json()["usage"]["prompt_tokens"]
    assert body["usage"]["prompt_tokens"] * 2 < full


def test_other_documents_are_another_cache_entry(rag_proxy: ProxyThread) -> None:
    first = _ask(rag_proxy.url, [GOLD, *FILLER])
    again = _ask(rag_proxy.url, [GOLD, *FILLER])
    other = _ask(rag_proxy.url, [{**GOLD, "text": GOLD["text"].replace("green", "red")}])
    for response in (first, again, other):
        response.raise_for_status()
    assert again.json()["id"] == first.json()["id"]  # the cached answer
    assert other.json()["id"] != first.json()["id"]
    assert metric_total(rag_proxy.url, "leangate_rag_selections_total") >= 2


@pytest.mark.parametrize(
    ("documents", "needle"),
    [
        ([{"id": "a", "text": ""}], "documents"),
        ([{"id": "a#1", "text": "x"}], "id"),
        ([{"id": "a", "text": {"nested": "object"}}], "text"),
        ([{"id": "a", "text": "x", "extra": 1}], "extra"),
        ("not a list", "documents"),
    ],
)
def test_bad_documents_are_a_clear_400(rag_proxy: ProxyThread, documents: Any, needle: str) -> None:
    response = _ask(rag_proxy.url, documents)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]
    assert httpx.get(f"{rag_proxy.url}/health", timeout=10).status_code == 200
