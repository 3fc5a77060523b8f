"""The ``rag`` stage against the real vLLM server: attached documents, citations, the
result cache keyed by the documents, and bad input."""

from __future__ import annotations

import uuid
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
        budget_ms: 30000
        settings: {ratio: 4, select_budget_ms: 30000}
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


BRIDGE_DOCS = [
    {
        "id": "lighthouse",
        "text": "The Quillon Lighthouse stands on Varell Island. It was designed by the "
        "engineer Odile Brant in 1884.",
        "metadata": {"title": "Quillon Lighthouse"},
    },
    {
        "id": "brant",
        "text": "Odile Brant was a French civil engineer. She was born in Sarlenne in 1849.",
        "metadata": {"title": "Odile Brant"},
    },
    *FILLER,
]
CORPUS_POLICY = """
tenants:
  reader-{run}: {{api_keys: [sk-reader-{run}]}}
  other-{run}: {{api_keys: [sk-other-{run}]}}
rules:
  - name: rag
    stages:
      - use: rag
        budget_ms: 30000
        settings: {{corpora: [kb], top_k: 1, neighbours: 0, hops: 2, select_budget_ms: 30000}}
"""


def test_a_corpus_answers_with_a_second_hop_and_stays_its_tenants(
    vllm_url: str, redis_url: str, tmp_path: Any
) -> None:
    run = uuid.uuid4().hex[:8]
    policy = write_policy(tmp_path, CORPUS_POLICY.format(run=run))
    settings = proxy_settings(
        vllm_url, policy=policy, redis_url=redis_url, corpus_dir=tmp_path / "corpora"
    )
    reader = {"authorization": f"Bearer sk-reader-{run}"}
    other = {"authorization": f"Bearer sk-other-{run}"}
    question = "In which town was the designer of the Quillon Lighthouse born?"
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 4}
    with ProxyThread(settings) as proxy:
        added = httpx.post(
            f"{proxy.url}/v1/corpora/kb/documents",
            json={"documents": BRIDGE_DOCS},
            headers=reader,
            timeout=120,
        )
        assert added.status_code == 200, added.text
        try:
            mine = httpx.post(
                f"{proxy.url}/v1/chat/completions", json=body, headers=reader, timeout=300
            )
            theirs = httpx.post(
                f"{proxy.url}/v1/chat/completions", json=body, headers=other, timeout=300
            )
        finally:
            httpx.request(
                "DELETE", f"{proxy.url}/v1/corpora/kb", headers=reader, timeout=60
            ).raise_for_status()
    mine.raise_for_status()
    theirs.raise_for_status()
    # top_k 1: the lighthouse alone by the question; the engineer by the second hop
    assert set(mine.headers[CITATIONS_HEADER].split(", ")) == {"lighthouse#0", "brant#0"}
    assert theirs.headers[CITATIONS_HEADER] == ""  # the other tenant has no corpus "kb"


TWO_PART = "Who designed the Quillon Lighthouse, and in which town was that engineer born?"
DECOMPOSE_POLICY = """
rules:
  - name: decompose-then-rag
    stages:
      - use: decompose
        settings: {step_tokens: 16, cache_plans: false}
      - use: rag
        budget_ms: 30000
        settings: {mode: always, ratio: 4, select_budget_ms: 30000}
"""


def test_each_sub_question_selects_its_own_context(vllm_url: str, tmp_path: Any) -> None:
    """With ``decompose`` before ``rag``, every step goes through the rag stage with the
    request's documents: each sub-question retrieves for itself."""
    policy = write_policy(tmp_path, DECOMPOSE_POLICY)
    with ProxyThread(proxy_settings(vllm_url, policy=policy)) as proxy:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": TWO_PART}],
            "max_tokens": 8,
            "temperature": 0,
            "leangate": {"documents": [*FILLER, *BRIDGE_DOCS[:2]]},
        }
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        steps = int(response.headers["x-leangate-plan"].split("steps=")[1].split(";")[0])
        selections = metric_total(proxy.url, "leangate_rag_selections_total")
    assert steps >= 1
    assert selections == steps, "one selection per sub-question, none for plan or synthesis"
