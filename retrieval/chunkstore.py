"""Where a corpus's chunks, their vectors and its documents live: Redis or a sqlite file.

The chunk store is the corpus's source of truth. The search indexes (``index.py``) are
derived from it and can always be rebuilt from it without embedding anything, because each
chunk is kept with its vector. Every change bumps the corpus's version counter; an index
written for an older version is stale.

Everything is scoped by ``tenant_key(tenant)``: no method can name another tenant's data.

Redis layout (``<t>`` is the tenant's key, ``<c>`` the corpus name)::

    lg:t:<t>:corpora               set of corpus names
    lg:t:<t>:corpus:<c>:docs       hash  document id -> its number of chunks
    lg:t:<t>:corpus:<c>:chunks     hash  chunk id -> chunk JSON (text, title, metadata, ...)
    lg:t:<t>:corpus:<c>:vectors    hash  chunk id -> float32 vector bytes
    lg:t:<t>:corpus:<c>:version    counter, bumped by every change
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

from leangate.cache.store import redis_client

from .chunks import Chunk, chunk_id

T = TypeVar("T")
WRITE_BATCH = 1000
"""Hash fields per Redis command: a 100k-chunk corpus is not one giant command."""


@dataclass(frozen=True)
class CorpusInfo:
    name: str
    documents: int
    chunks: int


@dataclass(frozen=True)
class Removal:
    documents: int
    """How many of the asked-for documents were there."""
    chunk_ids: list[str]
    version: int


def tenant_key(tenant: str) -> str:
    """A fixed-length, path- and key-safe name for a tenant (names are free text)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:32]


def encode_chunk(chunk: Chunk) -> bytes:
    return orjson.dumps(
        {
            "doc_id": chunk.doc_id,
            "position": chunk.position,
            "title": chunk.title,
            "text": chunk.text,
            "start": chunk.start,
            "end": chunk.end,
            "sentences": list(chunk.sentences),
            "metadata": dict(chunk.metadata),
            "paragraph": chunk.paragraph,
        }
    )


def decode_chunk(raw: bytes | str) -> Chunk:
    data = orjson.loads(raw)
    data["sentences"] = tuple(data["sentences"])
    return Chunk(**data)


def document_chunk_ids(doc_id: str, count: int) -> list[str]:
    return [chunk_id(doc_id, position) for position in range(count)]


class ChunkStore(ABC):
    """One corpus's chunks and documents, per tenant; methods are safe to call concurrently,
    but a corpus's writers are serialized by ``Corpora`` (its per-corpus lock)."""

    async def aclose(self) -> None:  # noqa: B027
        pass

    @abstractmethod
    async def infos(self, tenant: str) -> list[CorpusInfo]:
        """The tenant's corpora, by name."""

    @abstractmethod
    async def version(self, tenant: str, corpus: str) -> int | None:
        """The corpus's version counter; None when the corpus does not exist."""

    @abstractmethod
    async def existing(self, tenant: str, corpus: str, doc_ids: Sequence[str]) -> list[str]:
        """Those of ``doc_ids`` already stored."""

    @abstractmethod
    async def put(
        self,
        tenant: str,
        corpus: str,
        doc_ids: Sequence[str],
        chunks: Sequence[Chunk],
        vectors: np.ndarray,
    ) -> int:
        """Store new documents, all their chunks and the chunks' vectors (rows of
        ``vectors``) in one transaction, creating the corpus if needed; returns the new
        version. A document may have no chunk (only whitespace)."""

    @abstractmethod
    async def remove(self, tenant: str, corpus: str, doc_ids: Sequence[str]) -> Removal:
        """Delete documents and their chunks in one transaction."""

    @abstractmethod
    async def chunks(
        self, tenant: str, corpus: str, chunk_ids: Sequence[str]
    ) -> list[Chunk | None]:
        """The chunks by id, None for an id not stored."""

    @abstractmethod
    async def everything(self, tenant: str, corpus: str) -> tuple[list[Chunk], np.ndarray]:
        """Every chunk of the corpus with its vector (rows of the array), to rebuild indexes."""

    @abstractmethod
    async def drop(self, tenant: str, corpus: str) -> bool:
        """Delete the corpus; returns whether it existed."""


def _document_counts(doc_ids: Sequence[str], chunks: Sequence[Chunk]) -> dict[str, int]:
    counts = dict.fromkeys(doc_ids, 0)
    for chunk in chunks:
        counts[chunk.doc_id] = counts.get(chunk.doc_id, 0) + 1
    return counts


def _vector_rows(raw: Sequence[bytes], dim: int) -> np.ndarray:
    if not raw:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(raw), dtype=np.float32).reshape(len(raw), dim).copy()


# --- Redis -----------------------------------------------------------------------------------


class RedisChunkStore(ChunkStore):
    def __init__(self, url: str, dim: int, *, timeout_s: float = 5.0) -> None:
        self.dim = dim
        # The proxy's Redis client (``redis_client``): a stale connection left by a restart
        # of Redis costs a retry, not a failed call (it was a 503). Every command here may
        # run twice: reads, and transactions (put, remove, drop), which run twice only if
        # the connection broke after Redis ran them: the version is bumped once more (an
        # index rebuilt for nothing), or ``drop`` reports the corpus already gone.
        self._redis: Any = redis_client(url, timeout_s=timeout_s)

    async def aclose(self) -> None:
        await self._redis.aclose()

    @staticmethod
    def _names_key(tenant: str) -> str:
        return f"lg:t:{tenant_key(tenant)}:corpora"

    @staticmethod
    def _key(tenant: str, corpus: str, part: str) -> str:
        return f"lg:t:{tenant_key(tenant)}:corpus:{corpus}:{part}"

    async def infos(self, tenant: str) -> list[CorpusInfo]:
        names = sorted(_text(n) for n in await self._redis.smembers(self._names_key(tenant)))
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hlen(self._key(tenant, name, "docs"))
                pipe.hlen(self._key(tenant, name, "chunks"))
            counts = await pipe.execute()
        return [
            CorpusInfo(name, int(counts[2 * i]), int(counts[2 * i + 1]))
            for i, name in enumerate(names)
        ]

    async def version(self, tenant: str, corpus: str) -> int | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.sismember(self._names_key(tenant), corpus)
            pipe.get(self._key(tenant, corpus, "version"))
            member, version = await pipe.execute()
        return int(version or 0) if member else None

    async def existing(self, tenant: str, corpus: str, doc_ids: Sequence[str]) -> list[str]:
        if not doc_ids:
            return []
        counts = await self._redis.hmget(self._key(tenant, corpus, "docs"), list(doc_ids))
        return [d for d, count in zip(doc_ids, counts, strict=True) if count is not None]

    async def put(
        self,
        tenant: str,
        corpus: str,
        doc_ids: Sequence[str],
        chunks: Sequence[Chunk],
        vectors: np.ndarray,
    ) -> int:
        docs = _document_counts(doc_ids, chunks)
        rows = np.ascontiguousarray(vectors, dtype=np.float32)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self._names_key(tenant), corpus)
            if docs:
                pipe.hset(self._key(tenant, corpus, "docs"), mapping=docs)
            for start in range(0, len(chunks), WRITE_BATCH):
                part = chunks[start : start + WRITE_BATCH]
                pipe.hset(
                    self._key(tenant, corpus, "chunks"),
                    mapping={c.id: encode_chunk(c) for c in part},
                )
                pipe.hset(
                    self._key(tenant, corpus, "vectors"),
                    mapping={c.id: rows[start + i].tobytes() for i, c in enumerate(part)},
                )
            pipe.incr(self._key(tenant, corpus, "version"))
            results = await pipe.execute()
        return int(results[-1])

    async def remove(self, tenant: str, corpus: str, doc_ids: Sequence[str]) -> Removal:
        docs_key = self._key(tenant, corpus, "docs")
        ids = list(dict.fromkeys(doc_ids))
        counts = await self._redis.hmget(docs_key, ids) if ids else []
        found = {d: int(c) for d, c in zip(ids, counts, strict=True) if c is not None}
        chunk_ids = [c for d, n in found.items() for c in document_chunk_ids(d, n)]
        async with self._redis.pipeline(transaction=True) as pipe:
            if found:
                pipe.hdel(docs_key, *found)
            for start in range(0, len(chunk_ids), WRITE_BATCH):
                part = chunk_ids[start : start + WRITE_BATCH]
                pipe.hdel(self._key(tenant, corpus, "chunks"), *part)
                pipe.hdel(self._key(tenant, corpus, "vectors"), *part)
            pipe.incr(self._key(tenant, corpus, "version"))
            results = await pipe.execute()
        return Removal(len(found), chunk_ids, int(results[-1]))

    async def chunks(
        self, tenant: str, corpus: str, chunk_ids: Sequence[str]
    ) -> list[Chunk | None]:
        if not chunk_ids:
            return []
        raw = await self._redis.hmget(self._key(tenant, corpus, "chunks"), list(chunk_ids))
        return [None if r is None else decode_chunk(r) for r in raw]

    async def everything(self, tenant: str, corpus: str) -> tuple[list[Chunk], np.ndarray]:
        texts: dict[str, bytes] = {}
        async for field, value in self._redis.hscan_iter(
            self._key(tenant, corpus, "chunks"), count=WRITE_BATCH
        ):
            texts[_text(field)] = value
        vectors: dict[str, bytes] = {}
        async for field, value in self._redis.hscan_iter(
            self._key(tenant, corpus, "vectors"), count=WRITE_BATCH
        ):
            vectors[_text(field)] = value
        ids = sorted(texts.keys() & vectors.keys())
        return [decode_chunk(texts[i]) for i in ids], _vector_rows(
            [vectors[i] for i in ids], self.dim
        )

    async def drop(self, tenant: str, corpus: str) -> bool:
        parts = ("docs", "chunks", "vectors", "version")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(self._names_key(tenant), corpus)
            pipe.delete(*(self._key(tenant, corpus, p) for p in parts))
            removed, _ = await pipe.execute()
        return bool(removed)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- sqlite ----------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS corpora (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE IF NOT EXISTS documents (
    tenant TEXT NOT NULL, corpus TEXT NOT NULL, id TEXT NOT NULL, chunks INTEGER NOT NULL,
    PRIMARY KEY (tenant, corpus, id));
CREATE TABLE IF NOT EXISTS chunks (
    tenant TEXT NOT NULL, corpus TEXT NOT NULL, id TEXT NOT NULL,
    data BLOB NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (tenant, corpus, id));
"""


class SqliteChunkStore(ChunkStore):
    """The same store in one sqlite file, for a proxy without Redis. sqlite3 blocks, so
    every call runs in a worker thread; one connection, used by one thread at a time."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = dim
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        """The connection, opened on first use: a proxy that never uses a corpus creates
        no file."""
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(SCHEMA)
            self._connection = connection
        return self._connection

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self._connection is not None:
                    self._connection.close()
                    self._connection = None

        await asyncio.to_thread(close)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._open())

        return await asyncio.to_thread(locked)

    async def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def atomic(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._run(atomic)

    async def infos(self, tenant: str) -> list[CorpusInfo]:
        query = """
            SELECT c.name,
                (SELECT COUNT(*) FROM documents d WHERE d.tenant = c.tenant AND d.corpus = c.name),
                (SELECT COUNT(*) FROM chunks k WHERE k.tenant = c.tenant AND k.corpus = c.name)
            FROM corpora c WHERE c.tenant = ? ORDER BY c.name"""
        rows = await self._run(lambda db: db.execute(query, (tenant_key(tenant),)).fetchall())
        return [CorpusInfo(str(n), int(d), int(c)) for n, d, c in rows]

    async def version(self, tenant: str, corpus: str) -> int | None:
        query = "SELECT version FROM corpora WHERE tenant = ? AND name = ?"
        row = await self._run(lambda db: db.execute(query, (tenant_key(tenant), corpus)).fetchone())
        return None if row is None else int(row[0])

    async def existing(self, tenant: str, corpus: str, doc_ids: Sequence[str]) -> list[str]:
        key = tenant_key(tenant)
        query = "SELECT 1 FROM documents WHERE tenant = ? AND corpus = ? AND id = ?"

        def find(db: sqlite3.Connection) -> list[str]:
            return [d for d in doc_ids if db.execute(query, (key, corpus, d)).fetchone()]

        return await self._run(find)

    async def put(
        self,
        tenant: str,
        corpus: str,
        doc_ids: Sequence[str],
        chunks: Sequence[Chunk],
        vectors: np.ndarray,
    ) -> int:
        key = tenant_key(tenant)
        rows = np.ascontiguousarray(vectors, dtype=np.float32)
        docs = _document_counts(doc_ids, chunks)

        def write(db: sqlite3.Connection) -> int:
            db.executemany(
                "INSERT INTO documents VALUES (?, ?, ?, ?)",
                [(key, corpus, d, n) for d, n in docs.items()],
            )
            db.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                [
                    (key, corpus, c.id, encode_chunk(c), rows[i].tobytes())
                    for i, c in enumerate(chunks)
                ],
            )
            return _bump(db, key, corpus)

        return await self._transaction(write)

    async def remove(self, tenant: str, corpus: str, doc_ids: Sequence[str]) -> Removal:
        key = tenant_key(tenant)

        def delete(db: sqlite3.Connection) -> Removal:
            found: dict[str, int] = {}
            for doc in dict.fromkeys(doc_ids):
                row = db.execute(
                    "SELECT chunks FROM documents WHERE tenant = ? AND corpus = ? AND id = ?",
                    (key, corpus, doc),
                ).fetchone()
                if row is not None:
                    found[doc] = int(row[0])
            chunk_ids = [c for d, n in found.items() for c in document_chunk_ids(d, n)]
            db.executemany(
                "DELETE FROM documents WHERE tenant = ? AND corpus = ? AND id = ?",
                [(key, corpus, d) for d in found],
            )
            db.executemany(
                "DELETE FROM chunks WHERE tenant = ? AND corpus = ? AND id = ?",
                [(key, corpus, c) for c in chunk_ids],
            )
            return Removal(len(found), chunk_ids, _bump(db, key, corpus))

        return await self._transaction(delete)

    async def chunks(
        self, tenant: str, corpus: str, chunk_ids: Sequence[str]
    ) -> list[Chunk | None]:
        key = tenant_key(tenant)
        query = "SELECT data FROM chunks WHERE tenant = ? AND corpus = ? AND id = ?"

        def read(db: sqlite3.Connection) -> list[Chunk | None]:
            rows = [db.execute(query, (key, corpus, c)).fetchone() for c in chunk_ids]
            return [None if row is None else decode_chunk(row[0]) for row in rows]

        return await self._run(read)

    async def everything(self, tenant: str, corpus: str) -> tuple[list[Chunk], np.ndarray]:
        query = "SELECT data, vector FROM chunks WHERE tenant = ? AND corpus = ? ORDER BY id"
        rows = await self._run(
            lambda db: db.execute(query, (tenant_key(tenant), corpus)).fetchall()
        )
        return [decode_chunk(r[0]) for r in rows], _vector_rows([r[1] for r in rows], self.dim)

    async def drop(self, tenant: str, corpus: str) -> bool:
        key = tenant_key(tenant)

        def delete(db: sqlite3.Connection) -> bool:
            for table in ("documents", "chunks"):
                db.execute(f"DELETE FROM {table} WHERE tenant = ? AND corpus = ?", (key, corpus))
            gone = db.execute("DELETE FROM corpora WHERE tenant = ? AND name = ?", (key, corpus))
            return gone.rowcount > 0

        return await self._transaction(delete)


def _bump(db: sqlite3.Connection, tenant: str, corpus: str) -> int:
    db.execute(
        "INSERT INTO corpora VALUES (?, ?, 1) ON CONFLICT (tenant, name) "
        "DO UPDATE SET version = version + 1",
        (tenant, corpus),
    )
    row = db.execute(
        "SELECT version FROM corpora WHERE tenant = ? AND name = ?", (tenant, corpus)
    ).fetchone()
    return int(row[0])
