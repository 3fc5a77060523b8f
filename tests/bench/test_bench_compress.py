"""``leangate bench compress`` without a backend: the protected-span set and its check,
the tune/held-out split, and a missing data folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from leangate.bench import compress, hotpot
from leangate.bench.protected import protected_prompts, violations


def test_the_checker_sees_what_compression_must_not_do() -> None:
    case = next(c for c in protected_prompts(seed=1, count=20) if c.hard)
    assert violations(case, case.text) == []
    assert "question altered" in violations(case, case.text.replace("Question:", "Q:"))
    lost = case.text.replace(case.hard[0], "")
    assert any("hard span lost" in v for v in violations(case, lost))
    cut = case.text.replace("Handle with care. Fragile.", "Handle with care.")
    if cut != case.text:
        assert violations(case, cut)


def test_compressed_prompts_keep_every_protected_span() -> None:
    for case in protected_prompts(seed=3, count=10):
        out, _ = compress.compress_text(case.text, lambda t: len(t.split()), 4.0)
        assert violations(case, out) == []


def test_the_split_is_fixed_by_the_id() -> None:
    ids = [f"id-{i}" for i in range(200)]
    tune = [i for i in ids if hotpot.is_tune(i)]
    assert 70 < len(tune) < 130
    assert tune == [i for i in ids if hotpot.is_tune(i)]


def test_without_the_data_it_says_what_is_missing(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    compress.add_arguments(parser)
    args = parser.parse_args(["--data-dir", str(tmp_path), "--parts", "fidelity,spans,e2e"])
    result = compress.run(args)
    assert result["missing_data"] == [str(tmp_path / "hotpotqa" / "dev_distractor_20.json")]
    assert result["protected_span_violations"] == 0
    assert "e2e_speedup_long" not in result
