"""VectorIndex tests."""

from __future__ import annotations

import time

import faiss
import numpy as np
import pytest

from leangate.cache.vector_index import Neighbor, VectorIndex

DIM = 8


def unit(*values: float) -> np.ndarray:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[: len(values)] = values
    return vector / np.linalg.norm(vector)


def test_search_best_first_within_scope() -> None:
    index = VectorIndex(DIM)
    index.add("a", "x", unit(1, 0))
    index.add("a", "y", unit(1, 1))
    index.add("b", "z", unit(1, 0))
    found = index.search("a", unit(1, 0.1), k=4)
    assert [n.entry_id for n in found] == ["x", "y"]
    assert found[0].score > found[1].score
    assert found[0].score == pytest.approx(float(unit(1, 0.1) @ unit(1, 0)), abs=1e-6)
    assert index.search("missing", unit(1, 0)) == []
    assert len(index) == 3


def test_k_limits_results() -> None:
    index = VectorIndex(DIM)
    for i in range(10):
        index.add("s", f"e{i}", unit(1, i / 10))
    assert len(index.search("s", unit(1, 0), k=3)) == 3
    assert index.search("s", unit(1, 0), k=0) == []


def test_readd_replaces_and_can_move_scope() -> None:
    index = VectorIndex(DIM)
    index.add("a", "x", unit(1, 0))
    index.add("a", "x", unit(0, 1))
    assert len(index) == 1
    (only,) = index.search("a", unit(0, 1))
    assert isinstance(only, Neighbor)
    assert only.entry_id == "x"
    assert only.score == pytest.approx(1.0, abs=1e-6)
    index.add("b", "x", unit(0, 1))
    assert index.search("a", unit(0, 1)) == []
    assert [n.entry_id for n in index.search("b", unit(0, 1))] == ["x"]


def test_remove_keeps_other_entries() -> None:
    index = VectorIndex(DIM)
    index.add("a", "x", unit(1, 0))
    index.add("a", "y", unit(0, 1))
    index.add("a", "z", unit(1, 1))
    assert index.remove("y") is True
    assert index.remove("y") is False
    assert "y" not in index
    assert [n.entry_id for n in index.search("a", unit(0, 1), k=5)] == ["z", "x"]
    assert index.remove("x") and index.remove("z")
    assert index.search("a", unit(1, 0)) == []
    assert len(index) == 0


def test_clear_and_dimension_check() -> None:
    index = VectorIndex(DIM)
    index.add("a", "x", unit(1))
    index.clear()
    assert len(index) == 0
    assert index.search("a", unit(1)) == []
    with pytest.raises(ValueError):
        index.add("a", "bad", np.ones(DIM + 1, dtype=np.float32))
    with pytest.raises(ValueError):
        VectorIndex(0)


def _unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    unit_rows: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit_rows


def test_search_matches_a_flat_index_after_adds_and_removals() -> None:
    rng = np.random.default_rng(7)
    rows = _unit_rows(600, DIM, seed=1)
    index = VectorIndex(DIM)
    kept: dict[str, np.ndarray] = {}
    for step in range(600):
        entry = f"e{step}"
        index.add("s", entry, rows[step])
        kept[entry] = rows[step]
        if step % 3 == 2:
            gone = str(rng.choice(sorted(kept)))
            assert index.remove(gone)
            del kept[gone]
    assert len(index) == len(kept)
    flat = faiss.IndexFlatIP(DIM)
    names = list(kept)
    flat.add(np.stack([kept[name] for name in names]))
    for query in _unit_rows(50, DIM, seed=2):
        scores, positions = flat.search(query.reshape(1, -1), 4)
        expected = [(names[p], float(s)) for s, p in zip(scores[0], positions[0], strict=True)]
        found = [(n.entry_id, n.score) for n in index.search("s", query, k=4)]
        assert [e for e, _ in found] == [e for e, _ in expected]
        assert [s for _, s in found] == pytest.approx([s for _, s in expected], abs=1e-6)


def test_removal_cost_does_not_grow_with_the_scope() -> None:
    """At the entry cap every addition evicts the oldest entry: 1,000 evictions from a
    20,000-entry scope of real-size vectors must not stall (rebuilding the scope took
    about 120 ms each, faiss's ``remove_ids`` 2-10 ms)."""
    dim, size = 384, 20_000
    index = VectorIndex(dim)
    for position, row in enumerate(_unit_rows(size, dim, seed=3)):
        index.add("s", f"e{position}", row)
    deadline = time.perf_counter() + 1.0
    removed = 0
    for position in range(1000):
        assert index.remove(f"e{position}")
        removed += 1
        if time.perf_counter() > deadline:
            break
    assert removed == 1000, f"only {removed} of 1,000 removals within 1 s"
    assert len(index) == size - 1000
    assert index.search("s", _unit_rows(1, dim, seed=4)[0], k=4)[0].entry_id in index
