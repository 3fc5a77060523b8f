"""Scoped in-memory vector index for the semantic cache.

One faiss ``IndexFlatIP`` per scope (tenant + model + conversation-context hash): a lookup can
never see another scope's entries, and exact inner-product search over a few thousand unit
vectors takes microseconds, so no approximate index is needed. Removal rebuilds the scope's
index from the kept vectors, which is cheap at these sizes and keeps positions dense.

Not locked: every method runs to completion without awaiting, which is enough for use from one
asyncio event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np


@dataclass(frozen=True)
class Neighbor:
    entry_id: str
    score: float


@dataclass
class _Scope:
    index: Any
    ids: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)


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
            bucket = self._scopes[scope] = _Scope(index=faiss.IndexFlatIP(self.dim))
        bucket.index.add(row)
        bucket.ids.append(entry_id)
        bucket.vectors.append(row[0])
        self._scope_of[entry_id] = scope

    def remove(self, entry_id: str) -> bool:
        """Drop ``entry_id``; returns whether it was present."""
        scope = self._scope_of.pop(entry_id, None)
        if scope is None:
            return False
        bucket = self._scopes[scope]
        position = bucket.ids.index(entry_id)
        del bucket.ids[position]
        del bucket.vectors[position]
        if not bucket.ids:
            del self._scopes[scope]
            return True
        bucket.index = faiss.IndexFlatIP(self.dim)
        bucket.index.add(np.stack(bucket.vectors))
        return True

    def search(self, scope: str, vector: np.ndarray, k: int = 4) -> list[Neighbor]:
        """The ``k`` entries of ``scope`` most similar to ``vector``, best first."""
        bucket = self._scopes.get(scope)
        if bucket is None or k <= 0:
            return []
        scores, positions = bucket.index.search(self._as_row(vector), min(k, len(bucket.ids)))
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
