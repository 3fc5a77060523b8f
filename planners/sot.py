"""The ``sot`` stage: Skeleton-of-Thought, only where it pays.

For a question whose answer has independent points, ask for a short outline (under a
regex, so it parses), then expand every point at once: vLLM batches them, so the answer
takes about as long as the outline plus one point. Streamed, point 1 flows while the
others are being written, and each later point follows as soon as the ones before it are
done (``SubRequests.join``).

Per request: the router (``planners/router.py``) must say the question suits it, and the
backend profile must predict SoT faster than a direct answer by ``min_speedup`` at the
current load. Any failure (an outline that does not parse, a timeout) answers directly,
as if the stage were off. The decision, its prediction and the outcome go out in the
``x-leangate-plan`` header and in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from leangate.middleware.answers import answer_text, finish_reason, whole_answer
from leangate.middleware.context import JsonResult, RequestContext, Result
from leangate.middleware.pipeline import Handler
from leangate.middleware.protocol import ChatCompletionRequest
from leangate.middleware.services import Services
from leangate.middleware.subrequests import Part, SubRequests
from leangate.planners.router import RouterWeights
from leangate.planners.skeleton import (
    EXPAND_FIELDS,
    MAX_POINTS,
    MIN_POINTS,
    Outline,
    expand_messages,
    parse_outline,
    skeleton_messages,
    skeleton_regex,
)

log = logging.getLogger(__name__)

PLAN_HEADER = "x-leangate-plan"
SAMPLING_FIELDS = ("model", "temperature", "top_p", "seed", "frequency_penalty")


class SotSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "always", "never"] = "auto"
    """``auto``: router and cost model decide; ``always`` / ``never`` force it."""
    max_points: int = Field(6, ge=MIN_POINTS, le=MAX_POINTS)
    skeleton_tokens: int = Field(64, ge=16, le=256)
    default_max_tokens: int = Field(400, ge=32)
    """The answer's length cap when the client sets none."""
    min_speedup: float = Field(1.2, gt=0)
    """Run SoT only when predicted at least this much faster than a direct answer."""
    point_budget_s: float = Field(120.0, gt=0)


class SkeletonError(ValueError):
    """The outline could not be used; the request is answered directly."""


@dataclass(frozen=True, slots=True)
class Decision:
    run: bool
    reason: str
    direct_s: float = 0.0
    sot_s: float = 0.0

    def header(self) -> str:
        if not self.direct_s:
            return f"{'sot' if self.run else 'direct'}; reason={self.reason}"
        return (
            f"{'sot' if self.run else 'direct'}; reason={self.reason}; "
            f"predicted_direct_s={self.direct_s:.2f}; predicted_sot_s={self.sot_s:.2f}"
        )


class SotStage:
    Settings: ClassVar[type[BaseModel]] = SotSettings
    default_budget_ms: ClassVar[float | None] = 250.0

    @classmethod
    def needs_for(cls, settings: SotSettings) -> frozenset[str]:
        """The router's embedder and the cost model's profile, unless the policy forces
        the decision."""
        return frozenset({"embedder", "profile"}) if settings.mode == "auto" else frozenset()

    def __init__(self, name: str, settings: SotSettings, services: Services) -> None:
        self.name = name
        self.settings = settings
        self.services = services
        self.router = RouterWeights.load()

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        question = _question(ctx)
        if question is None:
            return await call_next(ctx)
        decision = await self.decide(ctx, question)
        ctx.response_headers[PLAN_HEADER] = decision.header()
        self.services.metrics.planner_decided(self.name, decision.run, decision.reason)
        if not decision.run:
            return await call_next(ctx)
        started = time.perf_counter()
        outline = await self._outline(ctx, question)
        skeleton_s = time.perf_counter() - started
        ctx.response_headers[PLAN_HEADER] += (
            f"; points={len(outline.points)}; skeleton_s={skeleton_s:.2f}"
        )
        result = await self._expand(ctx, question, outline)
        ctx.scope.defer(lambda: self._record(decision, started))
        return result

    # --- deciding ----------------------------------------------------------------------------

    async def decide(self, ctx: RequestContext, question: str) -> Decision:
        mode = self.settings.mode
        if mode != "auto":
            return Decision(mode == "always", f"policy-{mode}")
        vector = (await self.services.embedder.aembed([question]))[0]
        if not self.router.suits(question, vector):
            return Decision(False, "router")
        if not self.services.profile.calibrated:
            return Decision(False, "uncalibrated")
        direct_s, sot_s = self.predict(ctx)
        run = direct_s >= self.settings.min_speedup * sot_s
        return Decision(run, "faster" if run else "not-faster", direct_s, sot_s)

    def predict(self, ctx: RequestContext) -> tuple[float, float]:
        """Predicted seconds of the direct answer and of SoT, at the current load."""
        profile = self.services.profile
        prompt = self.services.tokenizer.estimate_messages(ctx.model, ctx.body["messages"])
        cap = self._answer_tokens(ctx)
        points = self.settings.max_points
        skeleton = profile.predict(prompt + 60, self.settings.skeleton_tokens // 2)
        expand = profile.predict(prompt + 120, cap // points, parallel=points)
        return profile.predict(prompt, cap), skeleton + expand

    def _answer_tokens(self, ctx: RequestContext) -> int:
        body = ctx.body
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        return int(cap) if cap else self.settings.default_max_tokens

    # --- planning ----------------------------------------------------------------------------

    async def _outline(self, ctx: RequestContext, question: str) -> Outline:
        body = {
            **_sampling(ctx),
            "temperature": 0,
            # Small models loop on a list ("Use a broom ...", five times): penalising
            # repeats (vLLM's repetition_penalty) keeps the points distinct.
            "repetition_penalty": 1.2,
            "presence_penalty": 0.5,
            "messages": skeleton_messages(question),
            "max_tokens": self.settings.skeleton_tokens,
            "structured_outputs": {"regex": skeleton_regex(MIN_POINTS, self.settings.max_points)},
        }
        answer = await ctx.subrequests.complete(body)
        outline = parse_outline(answer_text(ctx.route, answer), self.settings.max_points)
        if outline is None:
            raise SkeletonError("the outline has too few usable points")
        return outline

    async def _expand(self, ctx: RequestContext, question: str, outline: Outline) -> Result:
        sub = ctx.subrequests
        per_point = max(self._answer_tokens(ctx) // len(outline.points), 16)
        bodies = [
            {
                **_sampling(ctx),
                "messages": expand_messages(question, outline, index),
                **EXPAND_FIELDS,
                "max_tokens": per_point,
                "stop": ["\n\n"],  # one paragraph per point
            }
            for index in range(len(outline.points))
        ]
        headings = [
            ("\n\n" if i else "") + f"{i + 1}. {point}: " for i, point in enumerate(outline.points)
        ]
        if ctx.stream:
            streams = [sub.stream(b, budget_s=self.settings.point_budget_s) for b in bodies]
            return sub.join([Part(s, before=h) for s, h in zip(streams, headings, strict=True)])
        return await self._whole(ctx, sub, bodies, headings)

    async def _whole(
        self,
        ctx: RequestContext,
        sub: SubRequests,
        bodies: list[dict[str, Any]],
        headings: list[str],
    ) -> Result:
        answers = await asyncio.wait_for(sub.gather(bodies), self.settings.point_budget_s)
        parts = zip(headings, answers, strict=True)
        text = "".join(heading + answer_text(ctx.route, a).strip() for heading, a in parts)
        finish = "length" if any(finish_reason(a) == "length" for a in answers) else "stop"
        whole = whole_answer(ctx.route, ctx.model, text, finish, ctx.scope.usage.as_dict())
        return JsonResult(orjson.dumps(whole))

    def _record(self, decision: Decision, started: float) -> None:
        actual = time.perf_counter() - started
        self.services.metrics.planner_timed(self.name, decision.sot_s, actual)


def _question(ctx: RequestContext) -> str | None:
    """The last user message, for plain chat requests SoT can answer; None otherwise."""
    request = ctx.request
    body = ctx.body
    if not isinstance(request, ChatCompletionRequest) or (body.get("n") or 1) > 1:
        return None
    if body.get("tools") or body.get("response_format") or body.get("logprobs"):
        return None
    last = request.messages[-1]
    if last.role != "user" or not isinstance(last.content, str) or not last.content.strip():
        return None
    return last.content


def _sampling(ctx: RequestContext) -> dict[str, Any]:
    return {k: ctx.body[k] for k in SAMPLING_FIELDS if k in ctx.body}
