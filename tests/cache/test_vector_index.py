"""VectorIndex tests."""

from __future__ import annotations

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
