"""A corpus's search indexes: faiss for the vectors, BM25 for the words, one snapshot.

``CorpusIndex`` is an immutable snapshot for one version of the chunk store: each change
builds a new one (in a worker thread) and the corpus swaps it in, so a search never sees a
half-applied change and never races faiss's own mutation.

Dense: up to ``exact_max_chunks`` chunks an exact ``IndexFlatIP`` (inside an
``IndexIDMap2``, which gives it ids); past it an ``IndexIVFFlat`` (inner product) trained
on the corpus's own vectors with ``nlist ~ 4 * sqrt(n)`` lists. The IVF index keeps ids
itself: wrapped in ``IndexIDMap2`` its ``remove_ids`` compacts the id map while the
inverted lists keep the old positions, and searches then return ids of the wrong rows (or
none; checked on faiss 1.15). An IVF index trained for ``n`` chunks is retrained from the
stored vectors once the corpus doubles past ``n``.

Rows (``chunk_ids[row]``) are the lexical index's rows; faiss ids are ``keys[row]``, a
64-bit hash of the chunk id, so ids survive deletions without a counter.

On disk (``save``/``load``) a snapshot is a folder: ``dense.faiss``, ``lexical.npz`` and
``rows.json`` (its version, the chunk ids, how the dense index was built).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import orjson

from .lexical import LexicalIndex

TRAIN_POINTS_PER_LIST = 64
"""k-means sample per IVF list: faiss's default (256) took several times longer to train
at 100k chunks for no measurable recall gain here."""

DenseKind = Literal["flat", "ivf"]


@dataclass(frozen=True)
class DenseSettings:
    dim: int
    exact_max_chunks: int
    nprobe: int


def chunk_key(chunk_id: str) -> int:
    """A chunk id's faiss id: 63 bits of its sha256 (collisions are negligible)."""
    return int.from_bytes(hashlib.sha256(chunk_id.encode()).digest()[:8], "big") >> 1


def _keys(chunk_ids: Sequence[str]) -> np.ndarray:
    return np.fromiter((chunk_key(c) for c in chunk_ids), dtype=np.int64, count=len(chunk_ids))


def _rows(vectors: np.ndarray, dim: int) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)


def new_dense(vectors: np.ndarray, keys: np.ndarray, settings: DenseSettings) -> tuple[Any, int]:
    """A dense index over ``vectors``, and the size it was trained for (0: exact)."""
    n = len(keys)
    if n <= settings.exact_max_chunks:
        index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(settings.dim))
        trained_for = 0
    else:
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(settings.dim), settings.dim, nlist, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        index.train(vectors)
        index.nprobe = settings.nprobe
        trained_for = n
    if n:
        index.add_with_ids(vectors, keys)
    return index, trained_for


@dataclass(frozen=True)
class CorpusIndex:
    version: int
    chunk_ids: tuple[str, ...]
    keys: np.ndarray
    dense: Any
    """A faiss index (``IndexIDMap2`` over ``IndexFlatIP``, or ``IndexIVFFlat``)."""
    trained_for: int
    lexical: LexicalIndex
    settings: DenseSettings

    @property
    def kind(self) -> DenseKind:
        return "ivf" if self.trained_for else "flat"

    def __len__(self) -> int:
        return len(self.chunk_ids)

    @classmethod
    def build(
        cls,
        version: int,
        chunk_ids: Sequence[str],
        texts: Sequence[str],
        vectors: np.ndarray,
        settings: DenseSettings,
    ) -> CorpusIndex:
        keys = _keys(chunk_ids)
        dense, trained_for = new_dense(_rows(vectors, settings.dim), keys, settings)
        lexical = LexicalIndex.empty().added(texts)
        return cls(version, tuple(chunk_ids), keys, dense, trained_for, lexical, settings)

    def outgrows(self, added: int) -> bool:
        """Whether adding ``added`` chunks calls for another kind of dense index (flat to
        IVF) or a retrained one (the corpus doubled since training)."""
        size = len(self) + added
        if self.trained_for:
            return size > 2 * self.trained_for
        return size > self.settings.exact_max_chunks

    def added(
        self, version: int, chunk_ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray
    ) -> CorpusIndex:
        keys = _keys(chunk_ids)
        dense: Any = faiss.clone_index(self.dense)
        if self.trained_for:
            dense.nprobe = self.settings.nprobe
        if len(keys):
            dense.add_with_ids(_rows(vectors, self.settings.dim), keys)
        return replace(
            self,
            version=version,
            chunk_ids=self.chunk_ids + tuple(chunk_ids),
            keys=np.concatenate([self.keys, keys]),
            dense=dense,
            lexical=self.lexical.added(texts),
        )

    def removed(self, version: int, chunk_ids: Sequence[str]) -> CorpusIndex:
        gone = _keys(chunk_ids)
        keep = ~np.isin(self.keys, gone)
        dense: Any = faiss.clone_index(self.dense)
        if self.trained_for:
            dense.nprobe = self.settings.nprobe
        if len(gone):
            dense.remove_ids(gone)
        return replace(
            self,
            version=version,
            chunk_ids=tuple(c for c, k in zip(self.chunk_ids, keep, strict=True) if k),
            keys=self.keys[keep],
            dense=dense,
            lexical=self.lexical.kept(keep),
        )

    def with_version(self, version: int) -> CorpusIndex:
        return replace(self, version=version)

    def dense_top(self, vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the ``n`` nearest chunks and their inner products, best first."""
        if not len(self) or n <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        scores, keys = self.dense.search(_rows(vector, self.settings.dim), min(n, len(self)))
        found = keys[0] >= 0
        rows = self._row_of(keys[0][found])
        return rows, scores[0][found]

    def _row_of(self, keys: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.keys, keys, sorter=self.key_order)
        return self.key_order[at].astype(np.int64)

    @cached_property
    def key_order(self) -> np.ndarray:
        """The rows sorted by key (8 ms at 100k chunks: computed once per snapshot, in the
        thread that built it)."""
        return np.argsort(self.keys, kind="stable")

    # --- disk --------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        faiss.write_index(self.dense, str(folder / "dense.faiss"))
        self.lexical.save(folder / "lexical.npz")
        meta = {
            "version": self.version,
            "trained_for": self.trained_for,
            "chunk_ids": list(self.chunk_ids),
        }
        (folder / "rows.json").write_bytes(orjson.dumps(meta))

    @classmethod
    def load(cls, folder: Path, settings: DenseSettings) -> CorpusIndex:
        meta = orjson.loads((folder / "rows.json").read_bytes())
        dense: Any = faiss.read_index(str(folder / "dense.faiss"))
        if meta["trained_for"]:
            dense.nprobe = settings.nprobe
        chunk_ids = tuple(meta["chunk_ids"])
        lexical = LexicalIndex.load(folder / "lexical.npz")
        if dense.ntotal != len(chunk_ids) or lexical.size != len(chunk_ids):
            raise ValueError(f"the index files in {folder} disagree")
        keys = _keys(chunk_ids)
        return cls(meta["version"], chunk_ids, keys, dense, meta["trained_for"], lexical, settings)
