"""A request can force its planner among those the policy runs, never past the policy; the
decompose stage's `auto` mode plans only questions that ask several things."""

from __future__ import annotations

from typing import Any

import pytest
from recording_backend import RecordingBackend, chat_context, services_of

from leangate.backend.client import BackendClient, BackendSettings
from leangate.middleware.context import RequestContext
from leangate.middleware.endpoint import forward
from leangate.middleware.pipeline import build_chain
from leangate.middleware.protocol import RequestOptions
from leangate.planners.decompose import PLAN_HEADER, DecomposeSettings, DecomposeStage
from leangate.planners.sot import SotSettings, SotStage

QUESTION = "What are three ways to keep a bicycle chain clean?"


def _ctx(client: BackendClient, planner: Any) -> RequestContext:
    return chat_context(client, QUESTION, options=RequestOptions(planner=planner))


async def through_decompose(
    settings: DecomposeSettings, question: str, planner: Any = None
) -> tuple[list[dict[str, Any]], RequestContext]:
    """``question`` through a chain of the decompose stage alone, against the scripted
    backend: the bodies it was sent, and the request's context."""
    backend = RecordingBackend()
    client = await backend.client()
    stage = DecomposeStage("decompose", settings, services_of(client))
    ctx = chat_context(client, question, options=RequestOptions(planner=planner))
    try:
        await build_chain([(stage, 5.0)], forward)(ctx)
    finally:
        await ctx.scope.aclose()
        await client.aclose()
    return backend.bodies, ctx


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "planner", "run", "reason"),
    [
        ("auto", "sot", True, "request-sot"),
        ("auto", "direct", False, "request-direct"),
        ("auto", "decompose", False, "request-decompose"),
        ("always", "direct", False, "request-direct"),
        ("never", "sot", False, "policy-never"),
    ],
)
async def test_sot_follows_the_request_within_the_policy(
    mode: str, planner: str, run: bool, reason: str
) -> None:
    client = BackendClient(BackendSettings(urls=["http://unused"]))
    stage = SotStage("sot", SotSettings(mode=mode), services_of(client))
    decision = await stage.decide(_ctx(client, planner), QUESTION)
    assert (decision.run, decision.reason) == (run, reason)


@pytest.mark.asyncio
@pytest.mark.parametrize("planner", ["sot", "direct"])
async def test_decompose_steps_aside_for_another_planner(planner: str) -> None:
    bodies, _ = await through_decompose(DecomposeSettings(), QUESTION, planner)
    assert len(bodies) == 1, "answered directly: no plan, no steps"
    assert bodies[0]["messages"][-1]["content"] == QUESTION


def test_the_forced_planner_is_part_of_the_cache_key() -> None:
    assert RequestOptions(planner="sot").answer_inputs() is not None
    assert RequestOptions().answer_inputs() is None


SEVERAL = "Who built the Harwick museum, and in which year did it open?"
ONE_QUESTION = "When was the keeper of the Marrow Point light born?"


@pytest.mark.asyncio
async def test_auto_answers_one_question_directly() -> None:
    bodies, ctx = await through_decompose(DecomposeSettings(mode="auto"), ONE_QUESTION)
    assert len(bodies) == 1 and bodies[0]["messages"][-1]["content"] == ONE_QUESTION
    assert ctx.response_headers[PLAN_HEADER] == "direct; reason=one-question"


@pytest.mark.asyncio
async def test_auto_plans_a_question_that_asks_two_things() -> None:
    """The scripted backend's plan ("ok") is no plan: the request is then answered
    directly, as on any failure before the first byte."""
    bodies, _ = await through_decompose(DecomposeSettings(mode="auto"), SEVERAL)
    assert len(bodies) == 2
    assert "structured_outputs" in bodies[0], "the first call asks for a plan"
    assert bodies[1]["messages"][-1]["content"] == SEVERAL
