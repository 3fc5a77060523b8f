"""The decompose plan parser: a plan written as the pattern asks reads back as written,
a stored plan reads back as the plan it was, and anything else is a ``PlanError``."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from leangate.planners.plan import (
    MAX_DEPTH,
    MAX_STEPS,
    MIN_STEPS,
    QUESTION_CHARS,
    Plan,
    PlanError,
    parse_plan,
)

_question = st.builds(
    lambda opener, words: f"{opener} {words}?",
    st.sampled_from(["What", "Which", "Who", "How", "Is"]),
    st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=8), min_size=1, max_size=6).map(
        " ".join
    ),
)


@st.composite
def _plans(draw: st.DrawFn) -> list[tuple[str, list[int]]]:
    """Distinct questions; each uses only earlier steps, no deeper than ``MAX_DEPTH``."""
    questions = draw(
        st.lists(_question, min_size=MIN_STEPS, max_size=MAX_STEPS, unique_by=str.lower)
    )
    steps: list[tuple[str, list[int]]] = []
    level: dict[int, int] = {}
    for number, question in enumerate(questions, 1):
        usable = [n for n in range(1, number) if level[n] < MAX_DEPTH]
        uses = sorted(draw(st.sets(st.sampled_from(usable), max_size=4))) if usable else []
        level[number] = 1 + max((level[n] for n in uses), default=0)
        steps.append((question, uses))
    return steps


def _written(steps: list[tuple[str, list[int]]], ending: str) -> str:
    lines = []
    for number, (question, uses) in enumerate(steps, 1):
        used = f" (uses {', '.join(map(str, uses))})" if uses else ""
        lines.append(f"{number}. {question}{used}")
    return ending.join(lines) + ending


@settings(max_examples=300, deadline=None)
@given(steps=_plans(), ending=st.sampled_from(["\n", "\r\n", "\r"]))
def test_a_plan_written_as_the_pattern_asks_reads_back_as_written(
    steps: list[tuple[str, list[int]]], ending: str
) -> None:
    plan = parse_plan(_written(steps, ending))
    assert [(s.question, list(s.needs)) for s in plan.steps] == steps
    assert Plan.from_data(json.loads(json.dumps(plan.to_data()))) == plan


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 9) | st.floats() | st.text(max_size=90),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=9), inner),
    max_leaves=30,
)
_steps = st.lists(
    st.fixed_dictionaries(
        {"question": _json, "needs": st.lists(st.integers(-2, 7), max_size=4) | _json}
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(data=_json | _steps)
def test_stored_data_of_any_shape_is_a_checked_plan_or_a_plan_error(data: Any) -> None:
    try:
        plan = Plan.from_data(data)
    except PlanError:
        return
    assert MIN_STEPS <= len(plan.steps) <= MAX_STEPS
    assert plan.depth() <= MAX_DEPTH
    for step in plan.steps:
        assert 5 <= len(step.question) <= QUESTION_CHARS
        assert all(1 <= n < step.number for n in step.needs)
