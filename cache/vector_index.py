"""Scoped in-memory vector index for the semantic cache.

One matrix of unit vectors per scope (tenant + model + conversation-context hash): a lookup
can never see another scope's entries. Search is faiss's exact inner-product k-NN
(``faiss.knn``, the kernel ``IndexFlatIP.search`` runs), so results are those of a flat
index; exact search over a few thousand vectors takes microseconds, so no approximate
index is needed.

Removal moves the scope's last row into the freed one: constant time whatever the scope's
size. (A flat index rebuilt per removal cost 120 ms at 20k entries; faiss's own
``remove_ids`` still shifts every later row and rebuilds the id map, 2-10 ms at 20k and
growing with the scope, and at the entry cap every addition evicts one entry.)

Not locked: every method runs to completion without awaiting, which is enough for use from one
asyncio event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

MIN_ROWS = 4


@dataclass(frozen=True)
class Neighbor:
    entry_id: str
    score: float


class _Scope:
    """A scope's rows: ``matrix[:len(ids)]``, row ``i`` belonging to ``ids[i]``."""

    __slots__ = ("ids", "matrix", "rows")

    def __init__(self, dim: int) -> None:
        self.matrix = np.empty((MIN_ROWS, dim), dtype=np.float32)
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}

    def add(self, entry_id: str, row: np.ndarray) -> None:
        size = len(self.ids)
        if size == len(self.matrix):
            self._resize(2 * size)
        self.matrix[size] = row
        self.ids.append(entry_id)
        self.rows[entry_id] = size

    def remove(self, entry_id: str) -> None:
        position = self.rows.pop(entry_id)
        last = len(self.ids) - 1
        moved = self.ids.pop()
        if position != last:
            self.matrix[position] = self.matrix[last]
            self.ids[position] = moved
            self.rows[moved] = position
        if len(self.matrix) > MIN_ROWS and last <= len(self.matrix) // 4:
            self._resize(len(self.matrix) // 2)

    def _resize(self, rows: int) -> None:
        size = len(self.ids)
        matrix = np.empty((rows, self.matrix.shape[1]), dtype=np.float32)
        matrix[:size] = self.matrix[:size]
        self.matrix = matrix


class VectorIndex:
    """Exact cosine (inner product of unit vectors) search, partitioned by scope."""

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = dim
        self._scopes: dict[str, _Scope] = {}
        self._scope_of: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._scope_of)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._scope_of

    def add(self, scope: str, entry_id: str, vector: np.ndarray) -> None:
        """Index ``vector`` under ``entry_id`` in ``scope``; re-adding an id replaces it."""
        row = self._as_row(vector)
        self.remove(entry_id)
        bucket = self._scopes.get(scope)
        if bucket is None:
            bucket = self._scopes[scope] = _Scope(self.dim)
        bucket.add(entry_id, row[0])
        self._scope_of[entry_id] = scope

    def remove(self, entry_id: str) -> bool:
        """Drop ``entry_id``; returns whether it was present."""
        scope = self._scope_of.pop(entry_id, None)
        if scope is None:
            return False
        bucket = self._scopes[scope]
        bucket.remove(entry_id)
        if not bucket.ids:
            del self._scopes[scope]
        return True

    def search(self, scope: str, vector: np.ndarray, k: int = 4) -> list[Neighbor]:
        """The ``k`` entries of ``scope`` most similar to ``vector``, best first."""
        bucket = self._scopes.get(scope)
        if bucket is None or k <= 0:
            return []
        size = len(bucket.ids)
        scores, positions = faiss.knn(
            self._as_row(vector), bucket.matrix[:size], min(k, size), faiss.METRIC_INNER_PRODUCT
        )
        return [
            Neighbor(entry_id=bucket.ids[int(pos)], score=float(score))
            for score, pos in zip(scores[0], positions[0], strict=True)
            if pos >= 0
        ]

    def clear(self) -> None:
        self._scopes.clear()
        self._scope_of.clear()

    def _as_row(self, vector: np.ndarray) -> np.ndarray:
        row = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if row.shape[1] != self.dim:
            raise ValueError(f"expected a {self.dim}-dim vector, got {row.shape[1]}")
        return row
