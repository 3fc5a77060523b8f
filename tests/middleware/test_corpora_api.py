"""The /v1/corpora routes through the app: tenants apart, bad input refused, nothing lost."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ProxyThread, proxy_settings, write_policy

from leangate.backend.transport import HttpxTransport
from leangate.retrieval.chunkstore import tenant_key

MODELS = {"object": "list", "data": [{"id": "m", "object": "model"}]}
RUN = uuid.uuid4().hex[:8]
TENANT_A, TENANT_B = f"corpus-a-{RUN}", f"corpus-b-{RUN}"
KEY_A, KEY_B = f"sk-a-{RUN}", f"sk-b-{RUN}"
A = {"authorization": f"Bearer {KEY_A}"}
B = {"authorization": f"Bearer {KEY_B}"}
MAX_BODY = 64 * 1024

DOCS = [
    {"id": "etna", "text": "Mount Etna is an active volcano in Sicily.", "metadata": {"n": 1}},
    {"id": "bread", "text": "Sourdough rises with wild yeast.\n\nThe crumb is open."},
]


def _backend(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=MODELS)


@pytest.fixture(scope="module")
def proxy(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    folder = tmp_path_factory.mktemp("corpora-api")
    policy = write_policy(
        folder,
        f"require_api_key: true\ntenants:\n  {TENANT_A}: {{api_keys: [{KEY_A}]}}\n"
        f"  {TENANT_B}: {{api_keys: [{KEY_B}]}}\nrules: []\n",
    )
    settings = proxy_settings(
        "http://backend.test",
        policy=policy,
        redis_url=redis_url,
        corpus_dir=Path(folder) / "corpora",
        max_body_bytes=MAX_BODY,
    )
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as running:
        yield running
    client = redis.Redis.from_url(redis_url)
    for tenant in (TENANT_A, TENANT_B):
        keys = list(client.scan_iter(match=f"lg:t:{tenant_key(tenant)}:*"))
        if keys:
            client.delete(*keys)
    client.close()


def _corpus() -> str:
    return f"kb-{uuid.uuid4().hex[:8]}"


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    return str(error["message"])


def test_ingest_list_query_delete_drop(proxy: ProxyThread) -> None:
    name = _corpus()
    url = f"{proxy.url}/v1/corpora/{name}"
    added = httpx.post(url + "/documents", json={"documents": DOCS}, headers=A, timeout=60)
    assert added.status_code == 200, added.text
    assert added.json() == {"corpus": name, "documents": 2, "chunks": 3}
    listed = httpx.get(f"{proxy.url}/v1/corpora", headers=A).json()
    assert listed["object"] == "list"
    assert {"name": name, "documents": 2, "chunks": 3} in listed["data"]

    found = httpx.post(url + "/query", json={"query": "volcano in Sicily", "top_k": 2}, headers=A)
    assert found.status_code == 200, found.text
    top = found.json()["data"][0]
    assert (top["id"], top["metadata"]) == ("etna#0", {"n": 1})
    assert "Etna" in top["text"] and top["score"] > 0

    deleted = httpx.request("DELETE", url + "/documents", json={"ids": ["etna"]}, headers=A)
    assert deleted.json() == {"deleted": 1}
    again = httpx.post(url + "/documents/delete", json={"ids": ["etna", "bread"]}, headers=A)
    assert again.json() == {"deleted": 1}
    assert httpx.delete(url, headers=A).json() == {"deleted": True}
    _error(httpx.delete(url, headers=A), 404)


def test_another_tenant_can_neither_read_list_query_nor_delete(proxy: ProxyThread) -> None:
    name = _corpus()
    url = f"{proxy.url}/v1/corpora/{name}"
    assert httpx.post(url + "/documents", json={"documents": DOCS}, headers=A).status_code == 200

    names = [c["name"] for c in httpx.get(f"{proxy.url}/v1/corpora", headers=B).json()["data"]]
    assert name not in names
    _error(httpx.post(url + "/query", json={"query": "volcano"}, headers=B), 404)
    _error(httpx.post(url + "/documents/delete", json={"ids": ["etna"]}, headers=B), 404)
    _error(httpx.delete(url, headers=B), 404)
    # B's own corpus of the same name is B's alone.
    own = httpx.post(url + "/documents", json={"documents": DOCS[:1]}, headers=B)
    assert own.json()["documents"] == 1

    listed = httpx.get(f"{proxy.url}/v1/corpora", headers=A).json()["data"]
    assert {"name": name, "documents": 2, "chunks": 3} in listed
    assert httpx.post(url + "/query", json={"query": "volcano"}, headers=A).status_code == 200
    for key in (None, "sk-unknown"):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        assert _error(httpx.get(f"{proxy.url}/v1/corpora", headers=headers), 401)
    httpx.delete(url, headers=A)
    httpx.delete(url, headers=B)


def test_bad_input_is_a_clear_4xx_and_loses_nothing(proxy: ProxyThread) -> None:
    name = _corpus()
    url = f"{proxy.url}/v1/corpora/{name}"
    docs = url + "/documents"
    assert httpx.post(docs, json={"documents": DOCS}, headers=A).status_code == 200
    headers = {**A, "content-type": "application/json"}

    assert "JSON" in _error(httpx.post(docs, content=b"{nope", headers=headers), 400)
    _error(httpx.post(docs, content=b"\xff\xfe\x00binary", headers=headers), 400)
    _error(httpx.post(docs, json={"documents": []}, headers=A), 400)
    _error(httpx.post(docs, json={"documents": [{"id": "x", "text": 5}]}, headers=A), 400)
    _error(httpx.post(docs, json={"documents": [{"id": "a#1", "text": "t"}]}, headers=A), 400)
    _error(httpx.post(docs, json={"documents": [{"id": "x", "text": ""}]}, headers=A), 400)
    _error(httpx.post(docs, json={"docs": DOCS}, headers=A), 400)
    big = [{"id": "big", "text": "word " * (MAX_BODY // 4)}]
    _error(httpx.post(docs, json={"documents": big}, headers=A), 413)
    bad_name = f"{proxy.url}/v1/corpora/-bad/documents"
    assert "corpus name" in _error(httpx.post(bad_name, json={"documents": DOCS}, headers=A), 400)
    twice = [{"id": "new", "text": "New text."}, {"id": "new", "text": "Again."}]
    assert "more than once" in _error(httpx.post(docs, json={"documents": twice}, headers=A), 400)
    stored = [{"id": "fresh", "text": "Fresh text."}, DOCS[0]]
    assert "etna" in _error(httpx.post(docs, json={"documents": stored}, headers=A), 409)
    _error(httpx.post(url + "/query", json={"query": ""}, headers=A), 400)
    _error(httpx.post(url + "/query", json={"query": "x", "top_k": 0}, headers=A), 400)
    _error(
        httpx.post(f"{proxy.url}/v1/corpora/none-{RUN}/query", json={"query": "x"}, headers=A), 404
    )

    listed = httpx.get(f"{proxy.url}/v1/corpora", headers=A).json()["data"]
    assert {"name": name, "documents": 2, "chunks": 3} in listed
    found = httpx.post(url + "/query", json={"query": "Fresh text", "top_k": 5}, headers=A)
    assert "fresh#0" not in [h["id"] for h in found.json()["data"]]
    assert httpx.get(f"{proxy.url}/health").status_code == 200
    httpx.delete(url, headers=A)


def test_a_batch_over_the_character_bound_is_a_413_and_stores_nothing(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documents are bounded by count (256) and, together, by characters of text
    (``LEANGATE_CORPUS_MAX_BATCH_CHARS``): what ingesting costs grows with the text."""
    monkeypatch.setenv("LEANGATE_CORPUS_MAX_BATCH_CHARS", "1000")
    tenant, key = f"chars-{RUN}", f"sk-chars-{RUN}"
    policy = write_policy(tmp_path, f"tenants:\n  {tenant}: {{api_keys: [{key}]}}\nrules: []\n")
    settings = proxy_settings(
        "http://backend.test",
        policy=policy,
        redis_url=redis_url,
        corpus_dir=tmp_path / "corpora",
        max_body_bytes=MAX_BODY,
    )
    headers = {"authorization": f"Bearer {key}"}
    name = _corpus()
    sentence = "Lighthouses guide ships along the rocky coast at night. " * 7  # 392 characters
    batch = [{"id": f"doc-{n}", "text": sentence} for n in range(3)]
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as proxy:
        docs = f"{proxy.url}/v1/corpora/{name}/documents"
        over = httpx.post(docs, json={"documents": batch}, headers=headers, timeout=60)
        listed = httpx.get(f"{proxy.url}/v1/corpora", headers=headers).json()["data"]
        within = httpx.post(docs, json={"documents": batch[:2]}, headers=headers, timeout=60)
        httpx.delete(f"{proxy.url}/v1/corpora/{name}", headers=headers)
    message = _error(over, 413)
    assert over.json()["error"]["code"] == "too_many_characters"
    assert message == "the documents hold 1176 characters of text; at most 1000 in one request"
    assert listed == [], "nothing stored"
    assert within.status_code == 200, within.text
    assert within.json()["documents"] == 2
