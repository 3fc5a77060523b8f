"""The ``decompose`` router: a question that asks several things, by its form only."""

from __future__ import annotations

from typing import Any

import pytest
from recording_backend import RecordingBackend, services_of

from leangate.middleware.context import RequestContext
from leangate.middleware.endpoint import forward
from leangate.middleware.pipeline import build_chain
from leangate.middleware.protocol import ChatCompletionRequest
from leangate.planners.decompose import PLAN_HEADER, DecomposeSettings, DecomposeStage
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


async def _through_auto(question: str) -> tuple[list[dict[str, Any]], RequestContext]:
    backend = RecordingBackend()
    client = await backend.client()
    stage = DecomposeStage("decompose", DecomposeSettings(mode="auto"), services_of(client))
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": 8}
    ctx = RequestContext(
        route="chat",
        body=body,
        raw=None,
        request=ChatCompletionRequest.model_validate(body),
        tenant="t",
        backend=client,
    )
    try:
        await build_chain([(stage, 5.0)], forward)(ctx)
    finally:
        await ctx.scope.aclose()
        await client.aclose()
    return backend.bodies, ctx


@pytest.mark.asyncio
async def test_auto_answers_one_question_directly() -> None:
    bodies, ctx = await _through_auto(ONE)
    assert len(bodies) == 1 and bodies[0]["messages"][-1]["content"] == ONE
    assert ctx.response_headers[PLAN_HEADER] == "direct; reason=one-question"


@pytest.mark.asyncio
async def test_auto_plans_a_question_that_asks_two_things() -> None:
    """The scripted backend's plan ("ok") is no plan: the request is then answered
    directly, as on any failure before the first byte."""
    bodies, _ = await _through_auto(SEVERAL)
    assert len(bodies) == 2
    assert "structured_outputs" in bodies[0], "the first call asks for a plan"
    assert bodies[1]["messages"][-1]["content"] == SEVERAL
