"""``leangate bench cache`` without its data: it says what is missing and runs the rest."""

from __future__ import annotations

from pathlib import Path

from leangate.bench import cache


def test_quality_names_every_missing_file(tmp_path: Path) -> None:
    result = cache._quality(tmp_path, quick=True)
    missing = result["quality_missing"]
    assert isinstance(missing, list)
    assert any("mock_data.json" in m for m in missing)
    assert any("qqp_tune.json" in m for m in missing)
    assert any(str(tmp_path) in m for m in missing)
    assert "semantic_precision" not in result
    assert "qqp_holdout_precision" not in result


def test_hit_pairs_fall_back_to_built_in_paraphrases(tmp_path: Path) -> None:
    assert cache._hit_pairs(tmp_path, 3) == cache.FALLBACK_HIT_PAIRS[:3]


def test_policy_keeps_the_default_budget() -> None:
    assert "budget_ms" not in cache.CACHE_POLICY
