"""Stages that belong to the pipeline itself rather than to a capability."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

from leangate.middleware.answers import answer_text, whole_answer
from leangate.middleware.context import JsonResult, RequestContext, Result
from leangate.middleware.pipeline import Handler
from leangate.middleware.protocol import ChatCompletionRequest
from leangate.middleware.services import Services
from leangate.middleware.subrequests import Part


class PassThrough:
    """Does nothing but call the rest of the chain: the pipeline's own test stage."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    default_budget_ms: ClassVar[float | None] = 5.0

    def __init__(self, name: str, settings: Settings, services: Services) -> None:
        self.name = name

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        return await call_next(ctx)


class ExampleFanout:
    """The worked example of ``docs/architecture.md``: two sub-requests at once, one answer.

    It asks the model for a one-sentence answer and, at the same time, for one concrete
    example, then answers with the sentence followed by the example. Streamed, the
    sentence flows while the example is still being generated. Any failure before the
    first byte gives the client the answer it would have had without the stage.
    """

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        part_tokens: int = Field(48, ge=1, le=1024)
        """Most tokens of each part."""
        part_budget_s: float = Field(60.0, gt=0)
        """Time limit of each part's sub-request."""

    default_budget_ms: ClassVar[float | None] = 50.0

    def __init__(self, name: str, settings: Settings, services: Services) -> None:
        self.name = name
        self.settings = settings

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        question = _last_user_text(ctx)
        if ctx.route != "chat" or not question or (ctx.body.get("n") or 1) > 1:
            return await call_next(ctx)
        bodies = [self._part(ctx, question, ask) for ask in (BRIEF, EXAMPLE)]
        sub = ctx.subrequests
        if ctx.stream:
            brief, example = (sub.stream(b, budget_s=self.settings.part_budget_s) for b in bodies)
            return sub.join([Part(brief), Part(example, before=EXAMPLE_HEADING)])
        answers = await sub.gather(bodies)
        brief_text, example_text = (answer_text(ctx.route, a) for a in answers)
        text = brief_text.strip() + EXAMPLE_HEADING + example_text.strip()
        whole = whole_answer(ctx.route, ctx.model, text, "stop", ctx.scope.usage.as_dict())
        return JsonResult(orjson.dumps(whole))

    def _part(self, ctx: RequestContext, question: str, ask: str) -> dict[str, Any]:
        body = {k: v for k, v in ctx.body.items() if k in SAMPLING_FIELDS}
        return {
            **body,
            "messages": [{"role": "system", "content": ask}, {"role": "user", "content": question}],
            "max_tokens": self.settings.part_tokens,
        }


BRIEF = "Answer in one short sentence."
EXAMPLE = "Give one concrete example that illustrates the answer, in one or two sentences."
EXAMPLE_HEADING = "\n\nFor example: "
SAMPLING_FIELDS = frozenset({"model", "temperature", "top_p", "seed", "stop"})


def _last_user_text(ctx: RequestContext) -> str:
    request = ctx.request
    if not isinstance(request, ChatCompletionRequest):
        return ""
    for message in reversed(request.messages):
        if message.role == "user" and isinstance(message.content, str):
            return message.content
    return ""
