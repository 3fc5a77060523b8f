"""Decomposition plans are model output: checked as bounded data, whatever was written."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leangate.planners.plan import (
    MAX_DEPTH,
    MAX_STEPS,
    QUESTION_CHARS,
    Plan,
    PlanError,
    Step,
    parse_plan,
    plan_regex,
)

GOOD = (
    "1. Which river runs through Alderford?\n"
    "2. How long is the Wendle canal?\n"
    "3. Is that river longer than the canal? (uses 1, 2)\n"
)


def test_a_plan_with_dependencies_parses() -> None:
    plan = parse_plan(GOOD)
    assert [s.needs for s in plan.steps] == [(), (), (1, 2)]
    assert plan.depth() == 2
    assert Plan.from_data(plan.to_data()) == plan


def test_a_question_written_twice_is_one_step() -> None:
    plan = parse_plan(
        "1. What do owls eat?\n2. Where do owls nest?\n3. What do owls eat?\n"
        "4. Do those nests keep that food dry? (uses 3, 2)\n"
    )
    assert [s.question for s in plan.steps][-1] == "Do those nests keep that food dry?"
    assert plan.steps[-1].needs == (1, 2) and len(plan.steps) == 3


def test_the_regex_allows_only_earlier_steps() -> None:
    pattern = re.compile(plan_regex(3))
    assert pattern.fullmatch(GOOD)
    assert not pattern.fullmatch("1. Who wrote it? (uses 2)\n2. When was it written?\n")
    assert not pattern.fullmatch("1. Only one question here?\n")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("1. What is the first step?\n2. What is next? (uses 2)\n", "not before it"),
        ("1. What is the first step?\n2. What is next? (uses 7)\n", "not before it"),
        ("1. What is the first step?\n2. What is the first step?\n", "2 to"),
        ("1. What is the only step?\n", "2 to"),
        ("2. What comes second?\n1. What comes first?\n", "out of order"),
        ("".join(f"{i}. Which part number {i} is it?\n" for i in range(1, 9)), "more than"),
    ],
)
def test_bad_plans_are_refused_whole(text: str, why: str) -> None:
    with pytest.raises(PlanError, match=why):
        parse_plan(text)


def test_a_plan_too_deep_is_refused() -> None:
    chain = "".join(
        f"{i}. Which link number {i} is it?" + (f" (uses {i - 1})" if i > 1 else "") + "\n"
        for i in range(1, MAX_DEPTH + 2)
    )
    with pytest.raises(PlanError, match="deeper"):
        parse_plan(chain)


def test_stored_plans_are_checked_again() -> None:
    with pytest.raises(PlanError):
        Plan.from_data([{"question": "Who is first?", "needs": [2]}, {"question": "And?"}])
    with pytest.raises(PlanError):
        Plan.from_data({"steps": []})


@given(st.text(max_size=2000))
def test_any_output_gives_a_bounded_acyclic_plan_or_an_error(text: str) -> None:
    try:
        plan = parse_plan(text)
    except PlanError:
        return
    assert 2 <= len(plan.steps) <= MAX_STEPS
    assert plan.depth() <= MAX_DEPTH
    for step in plan.steps:
        assert all(1 <= n < step.number for n in step.needs)
        assert 5 <= len(step.question) <= QUESTION_CHARS
        assert "\n" not in step.question and "<" not in step.question


@given(
    st.lists(st.tuples(st.text(min_size=5, max_size=300), st.lists(st.integers(0, 9))), max_size=8)
)
def test_stored_data_gives_a_checked_plan_or_an_error(items: list[tuple[str, list[int]]]) -> None:
    data = [{"question": q, "needs": n} for q, n in items]
    try:
        plan = Plan.from_data(data)
    except PlanError:
        return
    assert all(isinstance(s, Step) and all(0 < n < s.number for n in s.needs) for s in plan.steps)
