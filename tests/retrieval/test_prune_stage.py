"""The ``prune`` stage's failure paths, against a scripted backend: a scorer answer that
cannot be read leaves the text whole, a scorer that fails leaves the request as it was."""

from __future__ import annotations

import httpx
import pytest
from compress_corpus import long_prompt
from recording_backend import RecordingBackend, chat_context, services_of

from leangate.middleware.endpoint import forward
from leangate.middleware.metrics import Metrics
from leangate.middleware.pipeline import build_chain
from leangate.retrieval.prune import HEADER, PruneSettings, PruneStage

FORCED = PruneSettings(mode="always", min_prompt_tokens=100)


class FailingScorer(RecordingBackend):
    """Answers chats; every scoring call (``/v1/completions``) is a 500."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            return httpx.Response(500, json={"error": {"message": "scorer down"}})
        return await super().handle(request)


async def _run(backend: RecordingBackend) -> tuple[str, str | None, Metrics]:
    """A long prompt through the stage: what reached the chat endpoint, and the header."""
    client = await backend.client()
    services = services_of(client)
    stage = PruneStage("prune", FORCED, services)
    text = long_prompt(extra=6)
    ctx = chat_context(client, text)
    try:
        await build_chain([(stage, 5.0)], forward, services.metrics)(ctx)
    finally:
        await ctx.scope.aclose()
        await client.aclose()
    (chat,) = [b for b in backend.bodies if "messages" in b]
    assert chat["messages"][0]["content"] == text, "the prompt reached the backend whole"
    return text, ctx.response_headers.get(HEADER), services.metrics


@pytest.mark.asyncio
async def test_an_unreadable_scorer_answer_prunes_nothing() -> None:
    _, header, _ = await _run(RecordingBackend())
    assert header is not None and header.startswith("pruned; reason=policy-always;")
    assert "dropped=0;" in header


@pytest.mark.asyncio
async def test_a_failing_scorer_fails_open_and_is_counted() -> None:
    _, header, metrics = await _run(FailingScorer())
    assert header is None, "the stage's changes are dropped with it"
    failed = metrics.registry.get_sample_value(
        "leangate_stage_failed_open_total", {"stage": "prune", "reason": "error"}
    )
    assert failed == 1
