"""``leangate bench conversation`` without a backend: how its conversations are built and
split, and a missing data folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from leangate.bench import compress, conversation

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "hotpotqa").is_dir() or not (DATA / "fastchat").is_dir(),
    reason=f"the evaluation data is not at {DATA}",
)


def _words(text: str) -> int:
    return len(text.split())


@needs_data
def test_conversations_are_ten_turns_with_facts_planted_early_and_split_by_part() -> None:
    built = conversation.build(DATA, _words, per_part=2, seed=0)
    assert [c.tune for c in built] == [True, True, False, False]
    for c in built:
        assert len(c.turns) == 10
        assert c.facts and all(turn > 5 for turn in c.recall)
        early = "\n".join(c.turns[:5])
        assert all(f.in_text(early) for f in c.facts), "every fact is planted in turns 1-5"
    tune_facts = {f.text for c in built if c.tune for f in c.facts}
    held_facts = {f.text for c in built if not c.tune for f in c.facts}
    assert not tune_facts & held_facts
    assert conversation.build(DATA, _words, per_part=2, seed=0) == built, "seeded"


@needs_data
def test_facts_count_only_when_an_earlier_message_keeps_name_and_number() -> None:
    c = conversation.build(DATA, _words, per_part=1, seed=1)[0]
    turn = max(c.recall)
    fact = c.facts[0]
    question = {"role": "user", "content": "?"}
    whole = [{"role": "user", "content": "\n".join(c.turns[:5])}, question]
    kept, planted = conversation.facts_in_prompt(c, turn, whole)
    assert kept == planted == len(c.facts)
    cut = [{"role": "user", "content": whole[0]["content"].replace(fact.number, "")}, question]
    assert conversation.facts_in_prompt(c, turn, cut)[0] < planted


def test_without_the_data_nothing_is_measured(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    conversation.add_arguments(parser)
    result = conversation.run(parser.parse_args(["--data-dir", str(tmp_path)]))
    assert len(result["missing_data"]) == 2  # type: ignore[arg-type]


def test_compress_reports_the_conversation_figures_under_their_own_names() -> None:
    result: dict[str, object] = {"tokens_counted_with": "x", "e2e_speedup_long": 3.0}
    compress._merge(result, {"planted_fact_retention": 1.0, "e2e_speedup_long": 1.5})
    assert result == {
        "tokens_counted_with": "x",
        "e2e_speedup_long": 3.0,
        "planted_fact_retention": 1.0,
        "conversation_e2e_speedup_long": 1.5,
    }
