"""The ``decompose`` router: a question that asks several things, by its form only."""

from __future__ import annotations

import pytest

from leangate.planners.parts import question_parts

SEVERAL = "Who built the Harwick museum, and in which year did it open?"
ONE = "When was the keeper of the Marrow Point light born?"


@pytest.mark.parametrize(
    ("question", "parts"),
    [
        (SEVERAL, 2),
        ("Who built the museum? When did it open? Who runs it now?", 3),
        ("How is rope made and how long does it take?", 2),
        ("What does the harbour master do; and when does he ring the bell?", 2),
        (ONE, 1),
        ("What are three ways to keep a ferry deck dry?", 1),
        ("As a lighthouse keeper, what would you tell a visitor?", 1),
        ("If the bay freezes, how do the ferries cross it?", 1),
        ("Which town has a harbour in the north and whose fleet is the largest?", 1),
        ("Explain how a breakwater works and why granite is used.", 1),
        ("Describe the bay. What is it known for?", 1),
    ],
)
def test_questions_are_counted_by_their_form(question: str, parts: int) -> None:
    assert question_parts(question) == parts
