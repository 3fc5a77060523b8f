"""``leangate corpus``: a folder of .md and .jsonl files ingested into a served proxy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ProxyThread, proxy_settings

from leangate.backend.transport import HttpxTransport
from leangate.cli import main
from leangate.corpus_cli import batches, read_documents
from leangate.retrieval.chunkstore import tenant_key

KEY = f"sk-cli-{uuid.uuid4().hex[:8]}"


def _backend(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})


@pytest.fixture(scope="module")
def proxy(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    folder = tmp_path_factory.mktemp("corpus-cli")
    settings = proxy_settings(
        "http://backend.test", redis_url=redis_url, corpus_dir=folder / "corpora"
    )
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as running:
        yield running
    from leangate.middleware.policy import Policy

    tenant = Policy().tenant_for_key(KEY)
    assert tenant is not None
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"lg:t:{tenant_key(tenant)}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def _files(root: Path) -> Path:
    (root / "guides").mkdir(parents=True)
    (root / "guides" / "leave.md").write_text("# Leave\n\nStaff get 25 days of paid leave.\n")
    (root / "faq.txt").write_text("The office opens at 8 in the morning.\n")
    (root / "skip.pdf").write_bytes(b"%PDF")
    (root / "more.jsonl").write_text(
        '{"id": "j1", "text": "Parking is free for cyclists.", "metadata": {"k": 1}}\n'
        '\n{"id": "j2", "text": "Lunch is served at noon."}\n'
    )
    return root


def test_reading_files_and_batches(tmp_path: Path) -> None:
    docs = list(read_documents([_files(tmp_path)]))
    assert sorted(d["id"] for d in docs) == ["faq.txt", "guides/leave.md", "j1", "j2"]
    leave = next(d for d in docs if d["id"] == "guides/leave.md")
    assert leave["metadata"]["source"].endswith("guides/leave.md")
    assert [len(b) for b in batches(iter(docs), 3)] == [3, 1]


def test_ingest_list_and_delete_against_a_served_proxy(
    proxy: ProxyThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    common = ["--url", proxy.url, "--api-key", KEY]
    folder = _files(tmp_path)

    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as done:
            main(["corpus", *argv, *common])
        return int(done.value.code or 0)

    assert run("ingest", name, str(folder), "--batch", "2") == 0
    assert run("list") == 0
    assert f"{name}\t4 documents\t4 chunks" in capsys.readouterr().out
    found = httpx.post(
        f"{proxy.url}/v1/corpora/{name}/query",
        json={"query": "paid leave days", "top_k": 1},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert found.json()["data"][0]["id"] == "guides/leave.md#0"

    assert run("ingest", name, str(folder / "faq.txt")) == 1
    assert "already in the corpus" in capsys.readouterr().err
    assert run("ingest", name, str(tmp_path / "missing")) == 1
    assert "no such file" in capsys.readouterr().err

    assert run("delete", name, "--ids", "j1", "j2") == 0
    assert "2 documents deleted" in capsys.readouterr().out
    assert run("delete", name) == 0
    assert run("delete", name) == 1
    assert "404" in capsys.readouterr().err
