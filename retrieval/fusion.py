"""One ranking from two: the dense and the lexical candidates of a corpus search.

``weighted``: each list's scores are min-max normalised to [0, 1] over its own candidates
(a chunk missing from a list counts 0 there, below that list's worst candidate) and summed
with ``dense_weight`` and ``1 - dense_weight``. ``rrf``: reciprocal-rank fusion,
``w / (RRF_K + rank)`` summed over both lists, with the same weights. Which is better is
measured in ``bench/rag_corpus.py`` (``fusion_figures``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

FusionMethod = Literal["weighted", "rrf"]
RRF_K = 60


@dataclass(frozen=True, slots=True)
class Fused:
    row: int
    score: float
    dense: float
    """The raw dense score (cosine similarity); 0 when not a dense candidate."""
    lexical: float
    """The raw BM25 score; 0 when not a lexical candidate."""


def fuse(
    dense: tuple[np.ndarray, np.ndarray],
    lexical: tuple[np.ndarray, np.ndarray],
    k: int,
    *,
    dense_weight: float,
    method: FusionMethod,
) -> list[Fused]:
    """The ``k`` best rows of two ``(rows, scores)`` lists, each sorted best first."""
    raw_dense = _by_row(*dense)
    raw_lexical = _by_row(*lexical)
    if method == "rrf":
        part_dense, part_lexical = _reciprocal_ranks(dense[0]), _reciprocal_ranks(lexical[0])
    else:
        part_dense, part_lexical = _min_max(*dense), _min_max(*lexical)
    rows = raw_dense.keys() | raw_lexical.keys()
    fused = [
        Fused(
            row=row,
            score=dense_weight * part_dense.get(row, 0.0)
            + (1 - dense_weight) * part_lexical.get(row, 0.0),
            dense=raw_dense.get(row, 0.0),
            lexical=raw_lexical.get(row, 0.0),
        )
        for row in rows
    ]
    fused.sort(key=lambda f: (-f.score, -f.dense, f.row))
    return fused[:k]


def _by_row(rows: np.ndarray, scores: np.ndarray) -> dict[int, float]:
    return {int(r): float(s) for r, s in zip(rows, scores, strict=True)}


def _min_max(rows: np.ndarray, scores: np.ndarray) -> dict[int, float]:
    if not len(rows):
        return {}
    low, high = float(scores.min()), float(scores.max())
    span = high - low
    normal = (scores - low) / span if span > 0 else np.ones_like(scores)
    return _by_row(rows, normal)


def _reciprocal_ranks(rows: np.ndarray) -> dict[int, float]:
    return {int(r): 1.0 / (RRF_K + rank) for rank, r in enumerate(rows, start=1)}
