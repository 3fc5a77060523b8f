"""Named corpora, per tenant: documents chunked, embedded and indexed ahead of time.

    corpora = Corpora(CorpusSettings(), embedder, redis_url)
    await corpora.start()
    await corpora.add("acme", "handbook", [Document(id="leave", text="...")])
    hits = await corpora.search("acme", "handbook", question, vector, k=5)
    window = await corpora.neighbours("acme", "handbook", hits[0].chunk)

Three layers (see ``docs/architecture.md``, "Corpora"): the chunk store (``chunkstore.py``:
chunks, their vectors and the documents, in Redis or sqlite) is the truth; the search
indexes (``index.py``: faiss and BM25) are snapshots derived from it, kept in memory and on
disk under ``root``; this module orders the two. Each change goes to the store first, in
one transaction that bumps the corpus's version, then to a new snapshot for that version.
A snapshot older than the store's version (a crash between the two, another replica's
change, a missing file) is rebuilt from the stored vectors: nothing is ever embedded twice.

A tenant is only ever a key part: no method takes a path or a key from its caller, so one
tenant cannot name another's corpus.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from leangate.cache.embedder import Embedder

from .chunks import DEFAULT_CHUNK_TOKENS, Chunk, chunk_document, chunk_id
from .chunkstore import (
    ChunkStore,
    CorpusInfo,
    RedisChunkStore,
    SqliteChunkStore,
    tenant_key,
)
from .documents import Document
from .fusion import FusionMethod, fuse
from .index import CorpusIndex, DenseSettings

__all__ = [
    "AddResult",
    "Corpora",
    "CorpusInfo",
    "CorpusSettings",
    "DuplicateDocument",
    "Hit",
    "UnknownCorpus",
]

log = logging.getLogger(__name__)

CORPUS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CURRENT = "CURRENT"
"""The file naming a corpus's current snapshot folder (replaced atomically)."""


def default_root() -> Path:
    return Path(os.environ.get("LEANGATE_HOME") or "~/.cache/leangate").expanduser() / "corpora"


class CorpusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: Path = Field(default_factory=default_root)
    """Where index snapshots (and, without Redis, the sqlite chunk store) are kept."""
    exact_max_chunks: int = Field(20_000, ge=1)
    """Up to this many chunks, exact search (faiss ``IndexFlatIP``, about 1 ms at 20k);
    past it an IVF index trained on the corpus's vectors."""
    nprobe: int = Field(32, ge=1)
    """IVF lists searched per query (of ``4 * sqrt(chunks)``): more is slower and finds
    more of the true nearest chunks."""
    chunk_tokens: int = Field(DEFAULT_CHUNK_TOKENS, ge=16, le=512)
    """A chunk's size cap in rough tokens (``chunk_document``'s ``max_tokens``);
    all-MiniLM-L6-v2 reads 256 word pieces at most."""
    max_documents_per_request: int = Field(256, ge=1)
    """Most documents one ``add`` takes."""
    candidates: int = Field(50, ge=1)
    """How many dense and how many lexical candidates a search fuses (at least ``k``)."""
    fusion: FusionMethod = "weighted"
    """How the two candidate lists become one ranking (see ``fusion.py``)."""
    embed_batch: int = Field(64, ge=1)
    """Texts per embedder call while adding documents."""


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float
    """The fused score: higher is better; comparable only within one search."""
    dense: float
    """Cosine similarity to the query (0 when not a dense candidate)."""
    lexical: float
    """BM25 score of the query's words (0 when not a lexical candidate)."""


@dataclass(frozen=True)
class AddResult:
    documents: int
    chunks: int


class DuplicateDocument(ValueError):
    """A document id given twice in one batch, or already in the corpus."""

    def __init__(self, ids: Sequence[str], *, stored: bool) -> None:
        shown = ", ".join(sorted(ids)[:5])
        where = "already in the corpus" if stored else "given more than once"
        super().__init__(f"document ids {where}: {shown}")
        self.ids = list(ids)
        self.stored = stored


class UnknownCorpus(LookupError):
    def __init__(self, corpus: str) -> None:
        super().__init__(f"no corpus named {corpus!r}")
        self.corpus = corpus


def check_corpus_name(corpus: str) -> None:
    if not CORPUS_NAME.fullmatch(corpus):
        raise ValueError(
            f"invalid corpus name {corpus[:80]!r}: 1 to 64 of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )


def index_text(chunk: Chunk) -> str:
    """What is embedded and matched: the heading names what the chunk's pronouns mean."""
    return f"{chunk.title}\n{chunk.text}" if chunk.title else chunk.text


class Corpora:
    def __init__(self, settings: CorpusSettings, embedder: Embedder, redis_url: str | None) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store: ChunkStore = (
            RedisChunkStore(redis_url, embedder.dim)
            if redis_url
            else SqliteChunkStore(settings.root / "chunks.sqlite3", embedder.dim)
        )
        self._dense = DenseSettings(embedder.dim, settings.exact_max_chunks, settings.nprobe)
        self._snapshots: dict[tuple[str, str], CorpusIndex] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def start(self) -> None:
        """Nothing to open yet: the store connects, and files are created, on first use, so
        a proxy whose tenants use no corpus writes nothing and a Redis that is down at
        start-up fails only corpus calls."""

    async def aclose(self) -> None:
        await self.store.aclose()

    # --- changes -----------------------------------------------------------------------------

    async def add(self, tenant: str, corpus: str, documents: Sequence[Document]) -> AddResult:
        """Chunk, embed and index new documents. Nothing of the batch is stored when one of
        its ids is repeated or already in the corpus (``DuplicateDocument``)."""
        check_corpus_name(corpus)
        self._check_batch(documents)
        await self._refuse_stored(tenant, corpus, documents)
        chunks = await asyncio.to_thread(self._chunk_all, documents)
        vectors = await self._embed([index_text(c) for c in chunks])
        key = (tenant, corpus)
        async with self._lock(key):
            await self._refuse_stored(tenant, corpus, documents)
            before = await self.store.version(tenant, corpus)
            current = None if before is None else await self._fresh(tenant, corpus, before)
            version = await self.store.put(
                tenant, corpus, [d.id for d in documents], chunks, vectors
            )
            if current is None:
                ids, texts = [c.id for c in chunks], [index_text(c) for c in chunks]
                build = CorpusIndex.build(version, ids, texts, vectors, self._dense)
                await self._swap(key, await asyncio.to_thread(self._ready, build))
            elif current.version + 1 != version or current.outgrows(len(chunks)):
                await self._rebuild(tenant, corpus, version)
            else:
                await self._apply(key, current, version, chunks, vectors)
        return AddResult(len(documents), len(chunks))

    async def delete_documents(self, tenant: str, corpus: str, ids: Sequence[str]) -> int:
        """Delete documents (their chunks and vectors); returns how many were there."""
        check_corpus_name(corpus)
        key = (tenant, corpus)
        async with self._lock(key):
            before = await self.store.version(tenant, corpus)
            if before is None:
                raise UnknownCorpus(corpus)
            current = await self._fresh(tenant, corpus, before)
            removal = await self.store.remove(tenant, corpus, ids)
            if removal.version != before + 1:
                await self._rebuild(tenant, corpus, removal.version)
            else:
                await self._apply_removal(key, current, removal.version, removal.chunk_ids)
        return removal.documents

    async def drop(self, tenant: str, corpus: str) -> bool:
        """Delete the corpus and everything of it; returns whether it existed."""
        check_corpus_name(corpus)
        key = (tenant, corpus)
        async with self._lock(key):
            existed = await self.store.drop(tenant, corpus)
            self._snapshots.pop(key, None)
            await asyncio.to_thread(shutil.rmtree, self._folder(tenant, corpus), True)
        return existed

    # --- reading -----------------------------------------------------------------------------

    async def corpora(self, tenant: str) -> list[CorpusInfo]:
        return await self.store.infos(tenant)

    async def search(
        self,
        tenant: str,
        corpus: str,
        query: str,
        vector: np.ndarray,
        k: int,
        *,
        dense_weight: float = 0.5,
    ) -> list[Hit]:
        """The ``k`` chunks best matching ``query`` (whose embedding is ``vector``), best
        first: dense and lexical candidates, fused (``CorpusSettings.fusion``)."""
        check_corpus_name(corpus)
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError("dense_weight must be between 0 and 1")
        snapshot = await self._snapshot(tenant, corpus)
        if k <= 0 or not len(snapshot):
            return []
        wanted = max(self.settings.candidates, k)

        def rank() -> list[tuple[str, float, float, float]]:
            fused = fuse(
                snapshot.dense_top(vector, wanted),
                snapshot.lexical.top(query, wanted),
                k,
                dense_weight=dense_weight,
                method=self.settings.fusion,
            )
            return [(snapshot.chunk_ids[f.row], f.score, f.dense, f.lexical) for f in fused]

        ranked = await asyncio.to_thread(rank)
        found = await self.store.chunks(tenant, corpus, [r[0] for r in ranked])
        return [
            Hit(chunk, score, dense, lexical)
            for chunk, (_, score, dense, lexical) in zip(found, ranked, strict=True)
            if chunk is not None
        ]

    async def neighbours(
        self, tenant: str, corpus: str, chunk: Chunk, span: int = 1
    ) -> list[Chunk]:
        """The window of ``chunk``'s document around it: the chunks at positions
        ``chunk.position - span`` to ``chunk.position + span`` that exist, ``chunk``
        included, in document order."""
        check_corpus_name(corpus)
        if await self.store.version(tenant, corpus) is None:
            raise UnknownCorpus(corpus)
        first = max(0, chunk.position - max(0, span))
        ids = [chunk_id(chunk.doc_id, p) for p in range(first, chunk.position + max(0, span) + 1)]
        return [c for c in await self.store.chunks(tenant, corpus, ids) if c is not None]

    # --- snapshots ---------------------------------------------------------------------------

    async def _snapshot(self, tenant: str, corpus: str) -> CorpusIndex:
        """The corpus's snapshot for the store's current version."""
        version = await self.store.version(tenant, corpus)
        if version is None:
            raise UnknownCorpus(corpus)
        key = (tenant, corpus)
        snapshot = self._snapshots.get(key)
        if snapshot is not None and snapshot.version == version:
            return snapshot
        async with self._lock(key):
            version = await self.store.version(tenant, corpus)
            if version is None:
                raise UnknownCorpus(corpus)
            return await self._fresh(tenant, corpus, version)

    async def _fresh(self, tenant: str, corpus: str, version: int) -> CorpusIndex:
        """The snapshot for ``version``: in memory, else from disk, else rebuilt from the
        store. The caller holds the corpus's lock."""
        key = (tenant, corpus)
        snapshot = self._snapshots.get(key)
        if snapshot is not None and snapshot.version == version:
            return snapshot
        snapshot = await asyncio.to_thread(self._read, self._folder(tenant, corpus), self._dense)
        if snapshot is not None and snapshot.version == version:
            self._snapshots[key] = snapshot
            return snapshot
        return await self._rebuild(tenant, corpus, version)

    async def _rebuild(self, tenant: str, corpus: str, version: int) -> CorpusIndex:
        log.info("corpus %s of tenant %s: rebuilding its index from the store", corpus, tenant)
        chunks, vectors = await self.store.everything(tenant, corpus)
        ids, texts = [c.id for c in chunks], [index_text(c) for c in chunks]

        def build() -> CorpusIndex:
            return self._ready(CorpusIndex.build(version, ids, texts, vectors, self._dense))

        snapshot = await asyncio.to_thread(build)
        await self._swap((tenant, corpus), snapshot)
        return snapshot

    async def _apply(
        self,
        key: tuple[str, str],
        current: CorpusIndex,
        version: int,
        chunks: Sequence[Chunk],
        vectors: np.ndarray,
    ) -> None:
        ids, texts = [c.id for c in chunks], [index_text(c) for c in chunks]

        def build() -> CorpusIndex:
            return self._ready(current.added(version, ids, texts, vectors))

        await self._swap(key, await asyncio.to_thread(build))

    async def _apply_removal(
        self, key: tuple[str, str], current: CorpusIndex, version: int, chunk_ids: list[str]
    ) -> None:
        def build() -> CorpusIndex:
            return self._ready(current.removed(version, chunk_ids))

        await self._swap(key, await asyncio.to_thread(build))

    async def _swap(self, key: tuple[str, str], snapshot: CorpusIndex) -> None:
        """Persist ``snapshot``, then serve it."""
        await asyncio.to_thread(self._write, self._folder(*key), snapshot)
        self._snapshots[key] = snapshot

    @staticmethod
    def _ready(snapshot: CorpusIndex) -> CorpusIndex:
        """Compute the snapshot's lookup table in the building thread, not in a search."""
        _ = snapshot.key_order
        return snapshot

    # --- helpers -----------------------------------------------------------------------------

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _folder(self, tenant: str, corpus: str) -> Path:
        name = hashlib.sha256(corpus.encode()).hexdigest()[:32]
        return self.settings.root / tenant_key(tenant) / name

    def _check_batch(self, documents: Sequence[Document]) -> None:
        if not documents:
            raise ValueError("no documents to add")
        most = self.settings.max_documents_per_request
        if len(documents) > most:
            raise ValueError(f"{len(documents)} documents in one request; at most {most}")
        counts = Counter(d.id for d in documents)
        repeated = [doc for doc, n in counts.items() if n > 1]
        if repeated:
            raise DuplicateDocument(sorted(repeated), stored=False)

    async def _refuse_stored(self, tenant: str, corpus: str, documents: Sequence[Document]) -> None:
        stored = await self.store.existing(tenant, corpus, [d.id for d in documents])
        if stored:
            raise DuplicateDocument(stored, stored=True)

    def _chunk_all(self, documents: Sequence[Document]) -> list[Chunk]:
        size = self.settings.chunk_tokens
        return [
            chunk
            for d in documents
            for chunk in chunk_document(d.id, d.text, metadata=d.metadata, max_tokens=size)
        ]

    async def _embed(self, texts: list[str]) -> np.ndarray:
        size = self.settings.embed_batch
        parts = [
            await self.embedder.aembed(texts[start : start + size])
            for start in range(0, len(texts), size)
        ]
        if not parts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    # --- disk --------------------------------------------------------------------------------

    @staticmethod
    def _read(folder: Path, settings: DenseSettings) -> CorpusIndex | None:
        """The snapshot ``CURRENT`` names, or None when there is none or it cannot be read
        (then it is rebuilt from the store)."""
        pointer = folder / CURRENT
        if not pointer.is_file():
            return None
        try:
            return CorpusIndex.load(folder / pointer.read_text().strip(), settings)
        except Exception as exc:
            log.warning("unreadable corpus index in %s (%r); rebuilding it", folder, exc)
            return None

    @staticmethod
    def _write(folder: Path, snapshot: CorpusIndex) -> None:
        """Write the snapshot into a new folder, then point ``CURRENT`` at it (renames are
        atomic, so a crash leaves the old snapshot or the new one), then drop the old."""
        folder.mkdir(parents=True, exist_ok=True)
        name = f"v{snapshot.version}-{uuid.uuid4().hex[:8]}"
        staging = folder / f".tmp-{name}"
        snapshot.save(staging)
        staging.rename(folder / name)
        pointer = folder / f".tmp-{CURRENT}-{name}"
        pointer.write_text(name)
        os.replace(pointer, folder / CURRENT)
        for old in folder.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
