"""A request can force its planner among those the policy runs, never past the policy."""

from __future__ import annotations

from typing import Any

import pytest
from recording_backend import RecordingBackend, services_of

from leangate.backend.client import BackendClient, BackendSettings
from leangate.middleware.context import RequestContext
from leangate.middleware.endpoint import forward
from leangate.middleware.pipeline import build_chain
from leangate.middleware.protocol import ChatCompletionRequest, RequestOptions
from leangate.planners.decompose import DecomposeSettings, DecomposeStage
from leangate.planners.sot import SotSettings, SotStage

QUESTION = "What are three ways to keep a bicycle chain clean?"


def _ctx(client: BackendClient, planner: Any) -> RequestContext:
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8}
    return RequestContext(
        route="chat",
        body=body,
        raw=None,
        request=ChatCompletionRequest.model_validate(body),
        tenant="t",
        backend=client,
        options=RequestOptions(planner=planner),
    )


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
    backend = RecordingBackend()
    client = await backend.client()
    stage = DecomposeStage("decompose", DecomposeSettings(), services_of(client))
    chain = build_chain([(stage, 5.0)], forward)
    ctx = _ctx(client, planner)
    try:
        await chain(ctx)
    finally:
        await ctx.scope.aclose()
        await client.aclose()
    assert len(backend.bodies) == 1, "answered directly: no plan, no steps"
    assert backend.bodies[0]["messages"][-1]["content"] == QUESTION


def test_the_forced_planner_is_part_of_the_cache_key() -> None:
    assert RequestOptions(planner="sot").answer_inputs() is not None
    assert RequestOptions().answer_inputs() is None
