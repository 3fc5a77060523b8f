"""Named corpora on the real embedder, with the real Redis and with the sqlite store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from leangate.cache.embedder import Embedder
from leangate.retrieval.chunkstore import tenant_key
from leangate.retrieval.corpora import (
    Corpora,
    CorpusSettings,
    DuplicateDocument,
    UnknownCorpus,
)
from leangate.retrieval.documents import Document

DOCS = [
    Document(
        id="volcanoes",
        text=(
            "# Volcanoes\n\nMount Etna is an active stratovolcano on the east coast of Sicily. "
            "It erupts several times a year.\n\n"
            "Lava flows from Etna have reached the town of Catania in 1669."
        ),
        metadata={"source": "geo"},
    ),
    Document(
        id="baking",
        text=(
            "Sourdough bread rises with a culture of wild yeast and lactobacilli. "
            "The starter is fed with flour and water every day.\n\n"
            "A long cold proof gives the crumb its open structure."
        ),
    ),
    Document(
        id="chess",
        text=(
            "The Sicilian Defence is a chess opening that begins 1. e4 c5. "
            "It is the most popular response to the king's pawn."
        ),
    ),
]


class CountingEmbedder(Embedder):
    """The real embedder, counting the texts it was asked to embed."""

    def __init__(self, shared: Embedder) -> None:
        super().__init__()
        self._shared = shared
        self.texts = 0

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += len(texts)
        return await self._shared.aembed(texts)


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    model = Embedder()
    model.load()
    yield model
    model.close()


@pytest.fixture
def tenant() -> str:
    return f"test-corpora-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clean_redis(redis_url: str, tenant: str) -> Iterator[str]:
    yield redis_url
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"lg:t:{tenant_key(tenant)}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["redis", "sqlite"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "redis":
        url: str = request.getfixturevalue("clean_redis")
        return url
    return None


async def _open(
    root: Path, embedder: Embedder, redis_url: str | None, **settings: object
) -> Corpora:
    corpora = Corpora(CorpusSettings(root=root, **settings), embedder, redis_url)
    await corpora.start()
    return corpora


@pytest.fixture
async def corpora(
    tmp_path: Path, embedder: Embedder, store_url: str | None
) -> AsyncIterator[Corpora]:
    opened = await _open(tmp_path, embedder, store_url)
    yield opened
    await opened.aclose()


async def _search(corpora: Corpora, tenant: str, name: str, query: str, k: int = 3) -> list[str]:
    vector = (await corpora.embedder.aembed([query]))[0]
    return [h.chunk.id for h in await corpora.search(tenant, name, query, vector, k)]


async def test_ingest_then_query_finds_the_right_chunk(corpora: Corpora, tenant: str) -> None:
    added = await corpora.add(tenant, "kb", DOCS)
    assert added.documents == 3 and added.chunks >= 4
    assert (await _search(corpora, tenant, "kb", "When did lava reach Catania?"))[0] == (
        "volcanoes#1"
    )
    hits = await corpora.search(
        tenant, "kb", "wild yeast starter", (await corpora.embedder.aembed(["yeast"]))[0], 2
    )
    assert hits[0].chunk.doc_id == "baking" and hits[0].lexical > 0 and hits[0].dense > 0
    assert hits[0].score >= hits[-1].score
    [info] = await corpora.corpora(tenant)
    assert (info.name, info.documents, info.chunks) == ("kb", 3, added.chunks)


async def test_neighbours_are_the_window_in_document_order(corpora: Corpora, tenant: str) -> None:
    await corpora.add(tenant, "kb", DOCS)
    [chunk] = await corpora.store.chunks(tenant, "kb", ["volcanoes#1"])
    assert chunk is not None
    window = await corpora.neighbours(tenant, "kb", chunk, span=1)
    assert [c.id for c in window] == ["volcanoes#0", "volcanoes#1"]
    assert window[0].metadata == {"source": "geo"} and window[0].title == "Volcanoes"


async def test_restart_serves_searches_without_embedding(
    tmp_path: Path, embedder: Embedder, store_url: str | None, tenant: str
) -> None:
    first = await _open(tmp_path, embedder, store_url)
    await first.add(tenant, "kb", DOCS)
    vector = (await embedder.aembed(["sourdough starter"]))[0]
    before = await first.search(tenant, "kb", "sourdough starter", vector, 3)
    await first.aclose()

    counting = CountingEmbedder(embedder)
    second = await _open(tmp_path, counting, store_url)
    after = await second.search(tenant, "kb", "sourdough starter", vector, 3)
    assert [h.chunk.id for h in after] == [h.chunk.id for h in before]
    assert counting.texts == 0

    # The index files gone: rebuilt from the stored vectors, still without embedding.
    for folder in (tmp_path / tenant_key(tenant)).iterdir():
        for part in folder.iterdir():
            if part.is_dir():
                for file in part.iterdir():
                    file.unlink()
    third = await _open(tmp_path, counting, store_url)
    rebuilt = await third.search(tenant, "kb", "sourdough starter", vector, 3)
    assert [h.chunk.id for h in rebuilt] == [h.chunk.id for h in before]
    assert counting.texts == 0
    await second.aclose()
    await third.aclose()


async def test_delete_documents_and_drop(corpora: Corpora, tenant: str) -> None:
    await corpora.add(tenant, "kb", DOCS)
    assert await corpora.delete_documents(tenant, "kb", ["volcanoes", "nope"]) == 1
    found = await _search(corpora, tenant, "kb", "Mount Etna lava Catania", k=10)
    assert found and not any(c.startswith("volcanoes#") for c in found)
    [info] = await corpora.corpora(tenant)
    assert info.documents == 2
    assert await corpora.drop(tenant, "kb") is True
    assert await corpora.corpora(tenant) == []
    with pytest.raises(UnknownCorpus):
        await _search(corpora, tenant, "kb", "Etna")
    with pytest.raises(UnknownCorpus):
        await corpora.delete_documents(tenant, "kb", ["baking"])
    assert await corpora.drop(tenant, "kb") is False


async def test_duplicates_are_refused_and_nothing_is_lost(corpora: Corpora, tenant: str) -> None:
    await corpora.add(tenant, "kb", DOCS[:2])
    new = Document(id="new", text="Brand new document about harbours.")
    with pytest.raises(DuplicateDocument) as stored:
        await corpora.add(tenant, "kb", [new, DOCS[0]])
    assert stored.value.stored and stored.value.ids == ["volcanoes"]
    with pytest.raises(DuplicateDocument):
        await corpora.add(tenant, "kb", [new, new])
    [info] = await corpora.corpora(tenant)
    assert info.documents == 2
    assert "new#0" not in await _search(corpora, tenant, "kb", "harbours", k=10)
    assert (await _search(corpora, tenant, "kb", "Etna eruptions"))[0].startswith("volcanoes#")


async def test_tenants_and_names_are_separate(corpora: Corpora, tenant: str) -> None:
    await corpora.add(tenant, "kb", DOCS)
    other = tenant + "-other"
    with pytest.raises(UnknownCorpus):
        await _search(corpora, other, "kb", "Etna")
    assert await corpora.corpora(other) == []
    assert await corpora.drop(other, "kb") is False
    for bad in ("", "-x", "a/b", "../kb", "x" * 65, "name with space"):
        with pytest.raises(ValueError, match="invalid corpus name"):
            await corpora.add(tenant, bad, DOCS)
    assert len(await _search(corpora, tenant, "kb", "Etna")) == 3


async def test_ivf_past_the_threshold_and_after_deletes(
    tmp_path: Path, embedder: Embedder, tenant: str
) -> None:
    corpora = await _open(tmp_path, embedder, None, exact_max_chunks=40, nprobe=64)
    texts = [f"Note {i}: the {w} of item {i} is recorded here." for i, w in enumerate(WORDS)]
    docs = [Document(id=f"n{i}", text=t) for i, t in enumerate(texts)]
    await corpora.add(tenant, "big", docs[:30])
    assert corpora._snapshots[(tenant, "big")].kind == "flat"
    await corpora.add(tenant, "big", docs[30:])
    snapshot = corpora._snapshots[(tenant, "big")]
    assert snapshot.kind == "ivf" and len(snapshot) == len(docs)
    assert (await _search(corpora, tenant, "big", texts[50], k=1)) == ["n50#0"]
    await corpora.delete_documents(tenant, "big", [f"n{i}" for i in range(0, 60, 2)])
    assert (await _search(corpora, tenant, "big", texts[51], k=1)) == ["n51#0"]
    assert "n50#0" not in await _search(corpora, tenant, "big", texts[50], k=10)
    await corpora.aclose()

    reopened = await _open(tmp_path, CountingEmbedder(embedder), None, exact_max_chunks=40)
    assert (await _search(reopened, tenant, "big", texts[51], k=1)) == ["n51#0"]
    assert reopened._snapshots[(tenant, "big")].kind == "ivf"
    await reopened.aclose()


WORDS = [
    "colour", "weight", "price", "owner", "height", "origin", "length", "width", "age", "grade",
    "shape", "flavour", "texture", "size", "value", "label", "status", "rank", "score", "speed",
    "depth", "volume", "mass", "charge", "tone", "pitch", "range", "class", "state", "level",
    "model", "brand", "batch", "series", "version", "region", "market", "sector", "stage", "phase",
    "cost", "yield", "margin", "share", "quota", "limit", "ratio", "index", "count", "total",
    "mean", "median", "mode", "spread", "bias", "error", "trend", "cycle", "season", "pattern",
]  # fmt: skip
