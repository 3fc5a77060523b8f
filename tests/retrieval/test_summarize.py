"""Summaries of earlier turns: what an extractive summary keeps (planted names and numbers,
hard spans, the instruction and the question), the fact rule, and how a model's summary is
made safe data or refused."""

from __future__ import annotations

from typing import Any

import pytest
from compress_corpus import GOLD, QUESTION, SECTIONS, document, more_sections

from leangate.retrieval.prompt import lone_plan
from leangate.retrieval.select import SelectSettings
from leangate.retrieval.summarize import (
    SUMMARY_PREFIX,
    ExtractiveSettings,
    LlmSettings,
    SummaryRefused,
    chunks,
    clean,
    extractive,
    fact_bonus,
    framed,
    llm_form,
    voiced,
    with_hard_spans,
)
from leangate.retrieval.turns import earlier_turns, recent_start

INSTRUCTION = "Here are my notes on the coast. Please answer from them."
SETTINGS = ExtractiveSettings(
    ratio=5.0, max_tokens=400, instruction_max_tokens=40, fact_weight=6.0, select=SelectSettings()
)
FACTS = [
    ("My colleague Wren Pallister will meet us at gate 4471.", "before"),
    ("The locker that Ivo Strand rented is number 815.", "between"),
    ("Note that the ferry ticket cost 2316 crowns.", "inside"),
]


def _count(text: str) -> int:
    return max(1, len(text.split()))


def _turn(question: str = QUESTION) -> str:
    """A long user turn with facts planted as a user plants them: in the instruction, on a
    line of their own between pasted sections, and before the question."""
    sections = document(SECTIONS + more_sections(8)).split("\n\n")
    sections.insert(3, FACTS[1][0])
    return "\n\n".join(
        [f"{INSTRUCTION} {FACTS[2][0]}", *sections, FACTS[0][0], f"Question: {question}"]
    )


def test_planted_names_and_numbers_survive_an_extractive_summary() -> None:
    text = _turn()
    summary = extractive(text, None, _count, SETTINGS)
    assert _count(summary) < _count(text) / 4
    for fact, _ in FACTS:
        assert fact in summary, fact
    assert summary.startswith(INSTRUCTION), "the instruction is kept as written"
    assert summary.endswith(f"Question: {QUESTION}"), "and the question"
    assert any(g in summary for g in GOLD), "the turn's own question still guides it"


def test_without_the_fact_bonus_the_facts_are_lost() -> None:
    """The bonus is what keeps them: the documents' sentences outscore them otherwise."""
    plain = ExtractiveSettings(5.0, 400, 40, 0.0, SelectSettings())
    summary = extractive(_turn(), None, _count, plain)
    assert not all(fact in summary for fact, _ in FACTS[:2])


def test_an_answer_is_summarized_for_the_question_it_answered() -> None:
    answer = document(SECTIONS + more_sections(6))
    summary = extractive(answer, QUESTION, _count, SETTINGS)
    assert _count(summary) <= _count(answer) / 4
    assert GOLD[0] in summary


def test_hard_spans_stay_in_a_summary() -> None:
    code = "```python\nprint('lighthouse')\n```"
    url = "https://example.org/tides"
    text = _turn().replace(FACTS[1][0], f"{code}\n\nTide tables are at {url} for the bay.")
    summary = extractive(text, None, _count, SETTINGS)
    assert code in summary and url in summary


@pytest.mark.parametrize(
    ("sentence", "own_line", "bonus"),
    [
        ("I booked table 12 under the name Mara Quill.", False, 1.0),
        ("We need 40 chairs.", False, 1.0),
        ("Please remember the code 5521.", False, 1.0),
        ("Esma Sultan was a daughter of Sultan Abdul Hamid I, born in 1778.", False, 0.0),
        ("The US army built 300 forts.", False, 0.0),
        ('His book "What I Learned in School" appeared in 2009.', False, 0.0),
        ("The parcel for Ada Voss has tracking number 7731.", False, 0.0),
        ("The parcel for Ada Voss has tracking number 7731.", True, 1.0),
        ("I think so too.", False, 0.0),
    ],
)
def test_the_fact_rule(sentence: str, own_line: bool, bonus: float) -> None:
    assert fact_bonus(sentence, own_line=own_line) == bonus


def test_roman_numerals_are_not_the_user_speaking() -> None:
    assert voiced("Yesterday I left.") and voiced("I am here.")
    assert not voiced("He fought in World War I.")


def test_a_model_summary_is_plain_data() -> None:
    source = "Ada Voss paid 120 crowns on 3 May."
    raw = "<|im_start|>assistant\nSystem: 1. Ada Voss paid 120 crowns.\n- On 3 May.<|im_end|>"
    assert clean(raw, source) == "Ada Voss paid 120 crowns. On 3 May."


@pytest.mark.parametrize(
    "raw", ["Ada Voss paid 150 crowns.", "   <|im_end|>  ", "assistant:"], ids=str
)
def test_a_model_summary_that_alters_numbers_or_says_nothing_is_refused(raw: str) -> None:
    with pytest.raises(SummaryRefused):
        clean(raw, "Ada Voss paid 120 crowns.")


def test_a_model_summary_carries_the_hard_spans_of_what_it_summarized() -> None:
    code = "```python\nprint('tide')\n```"
    answer = f'Run `x`. See https://example.org/a and {{"k": [1, 2]}} here.\n\n{code}\n\nDone.'
    found = lone_plan(answer, _count, question="What now?", instruction_max_tokens=40)
    assert found is not None
    out = with_hard_spans("Short.", found)
    assert out == f'Short.\n\nhttps://example.org/a\n\n{{"k": [1, 2]}}\n\n{code}'


def test_chunks_are_bounded_and_cover_the_text() -> None:
    text = document(SECTIONS + more_sections(10))
    pieces = chunks(text, _count, 60)
    assert len(pieces) > 3
    assert all(_count(p) <= 60 for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_a_model_summary_goes_between_the_instruction_and_the_question() -> None:
    text = _turn()
    found = lone_plan(text, _count, question=None, instruction_max_tokens=40)
    assert found is not None
    form = framed(found, f"{SUMMARY_PREFIX}The light was lit in 1887.")
    assert form == (
        f"{INSTRUCTION} {FACTS[2][0]}\n\n{SUMMARY_PREFIX}The light was lit in 1887.\n\n"
        f"Question: {QUESTION}"
    )


async def test_a_model_summary_with_a_number_not_in_the_text_is_refused() -> None:
    async def complete(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        reply = {"message": {"role": "assistant", "content": "It was lit in 1999."}}
        return [{"choices": [reply]} for _ in bodies]

    with pytest.raises(SummaryRefused):
        await llm_form(_turn(), None, _count, complete, LlmSettings(2000, 40, 400), 40)


def test_which_earlier_turns_may_be_summarized() -> None:
    long, short = "word " * 200, "A short one."
    messages = [
        {"role": "system", "content": long},
        {"role": "user", "content": long + "Question one?"},
        {"role": "assistant", "content": long},
        {"role": "user", "content": short},
        {"role": "assistant", "content": long},
        {"role": "user", "content": long},
        {"role": "assistant", "content": long},
        {"role": "user", "content": "Last?"},
    ]
    found = earlier_turns(messages, _count, min_turn_tokens=100, keep_recent_turns=1, exclude={2})
    assert [(t.index, t.recent) for t in found] == [(1, False), (4, False), (5, True), (6, True)]
    assert found[1].question == short, "an answer is summarized for the question it answered"
    assert found[0].question is None
    assert recent_start(messages, 0) == 7 and recent_start(messages, 2) == 3
    assert recent_start(messages, 9) == 0
