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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from leangate.middleware.answers import delta_text, whole_answer
from leangate.middleware.context import JsonResult, RequestContext, Result
from leangate.middleware.pipeline import Handler
from leangate.middleware.services import Services
from leangate.middleware.subrequests import Part, SubStream
from leangate.planners.requests import plannable_question, sampling
from leangate.planners.router import RouterWeights
from leangate.planners.skeleton import (
    MAX_POINTS,
    MIN_POINTS,
    FirstTitle,
    PointReader,
    expand_messages,
    skeleton_messages,
    skeleton_regex,
)

log = logging.getLogger(__name__)

PLAN_HEADER = "x-leangate-plan"


class SotSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "always", "never"] = "auto"
    """``auto``: router and cost model decide; ``always`` / ``never`` force it."""
    max_points: int = Field(6, ge=MIN_POINTS, le=MAX_POINTS)
    """Most points of an outline."""
    skeleton_tokens: int = Field(64, ge=16, le=256)
    """The outline's token cap."""
    default_max_tokens: int = Field(400, ge=32)
    """The answer's length cap when the client sets none."""
    min_speedup: float = Field(1.2, gt=0)
    """Run SoT only when predicted at least this much faster than a direct answer."""
    point_budget_s: float = Field(120.0, gt=0)
    """Time limit of the outline's and each point's sub-request; one over it fails the plan
    (before the first byte: answered directly)."""


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
        self._points_expected = float(settings.max_points)
        self._line_tokens = LINE_TOKENS
        """Tokens of an outline line, learned from this stage's finished outlines."""

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        question = plannable_question(ctx)
        if question is None:
            return await call_next(ctx)
        decision = await self.decide(ctx, question)
        ctx.response_headers[PLAN_HEADER] = decision.header()
        self.services.metrics.planner_decided(self.name, decision.run, decision.reason)
        if not decision.run:
            return await call_next(ctx)
        answer = _Answer(self, ctx, question)
        ctx.scope.defer(lambda: self._record(decision, answer))
        if ctx.stream:
            return ctx.subrequests.join(answer.parts())
        result = await answer.whole()
        took = time.perf_counter() - answer.started
        ctx.response_headers[PLAN_HEADER] += (
            f"; points={len(answer.points)}; calls={len(answer.points) + 1}; actual_s={took:.2f}"
        )
        return result

    # --- deciding ----------------------------------------------------------------------------

    async def decide(self, ctx: RequestContext, question: str) -> Decision:
        mode, forced = self.settings.mode, ctx.options.planner
        if mode == "never" or (forced is None and mode == "always"):
            return Decision(mode == "always", f"policy-{mode}")
        if forced is not None:
            return Decision(forced == "sot", f"request-{forced}")
        vector = (await self.services.embedder.aembed([question]))[0]
        if not self.router.suits(question, vector):
            return Decision(False, "router")
        if not self.services.profile.calibrated:
            return Decision(False, "uncalibrated")
        direct_s, sot_s = self.predict(ctx)
        run = direct_s >= self.settings.min_speedup * sot_s
        return Decision(run, "faster" if run else "not-faster", direct_s, sot_s)

    def predict(self, ctx: RequestContext) -> tuple[float, float]:
        """Predicted seconds of the direct answer and of SoT, at the current load. SoT's
        critical path is the outline, then the last point (see ``point_caps``)."""
        profile = self.services.profile
        prompt = self.services.tokenizer.estimate_messages(ctx.model, ctx.body["messages"])
        cap = self._answer_tokens(ctx)
        points = self.settings.max_points
        caps = self.point_caps(ctx)
        outline_tokens = min(round(points * self._line_tokens), self.settings.skeleton_tokens)
        skeleton = profile.predict(prompt + 60, outline_tokens)
        expand = profile.predict(prompt + 120, caps[points - 1], parallel=points)
        return profile.predict(prompt, cap), skeleton + expand

    def _answer_tokens(self, ctx: RequestContext) -> int:
        return ctx.answer_cap(self.settings.default_max_tokens)

    def point_caps(self, ctx: RequestContext) -> list[int]:
        """Each point's token cap (``staggered_caps``), from the answer's cap and the
        points and outline line lengths this stage's finished outlines had."""
        return staggered_caps(
            self._answer_tokens(ctx),
            self._points_expected,
            self._line_tokens,
            self.settings.max_points,
        )

    def _record(self, decision: Decision, answer: _Answer) -> None:
        if answer.points:
            self._points_expected += 0.1 * (len(answer.points) - self._points_expected)
            written = (answer.outline.usage or {}).get("completion_tokens")
            if isinstance(written, int) and written > 0:
                per_line = written / len(answer.points)
                self._line_tokens += 0.1 * (per_line - self._line_tokens)
        actual = time.perf_counter() - answer.started
        self.services.metrics.planner_timed(self.name, decision.sot_s, actual)
        if decision.direct_s:
            self.services.metrics.stage_saved(self.name, decision.direct_s - actual)


class _Answer:
    """One SoT answer as it is made: the outline is streamed, and each point is expanded
    as soon as its line is complete, while the model is still writing the next ones."""

    def __init__(self, stage: SotStage, ctx: RequestContext, question: str) -> None:
        self.ctx = ctx
        self.question = question
        self.settings = stage.settings
        self.caps = stage.point_caps(ctx)
        self.reader = PointReader(self.settings.max_points)
        self.started = time.perf_counter()
        self.sub = ctx.subrequests
        self.outline = self.sub.stream(self._outline_body(), budget_s=self.settings.point_budget_s)

    @property
    def points(self) -> list[str]:
        return self.reader.points

    async def parts(self) -> AsyncIterator[Part]:
        """The streamed answer's parts: the outline's first line as it is written (see
        ``FirstTitle``), point 1's text after it, then each later point with its heading."""
        title = FirstTitle(self.ctx.route)
        yield Part(title)
        try:
            async for index, stream in self._expansions(on_text=title.feed):
                heading = _heading(index, self.points[index])
                if index == 0 and title.shown:
                    # go on from the shown title ("1." or the whole line)
                    shown = len(title.shown)
                    heading = heading[shown:] if heading.startswith(title.shown) else ": "
                yield Part(stream, before=heading)
        finally:
            title.end()
        if not self.points:
            raise SkeletonError("the outline has no usable point")

    async def whole(self) -> Result:
        streams: list[SubStream] = []
        try:
            async for _, stream in self._expansions():
                streams.append(stream)
            if len(streams) < MIN_POINTS:
                raise SkeletonError("the outline has too few usable points")
            texts = await asyncio.gather(*(stream.text() for stream in streams))
        except BaseException:
            for stream in streams:  # the direct answer that follows needs the batch
                stream.close()
            raise
        text = "".join(
            _heading(i, point) + body.strip()
            for i, (point, (body, _)) in enumerate(zip(self.points, texts, strict=True))
        )
        finish = "length" if any(reason == "length" for _, reason in texts) else "stop"
        usage = self.ctx.scope.usage.as_dict()
        return JsonResult(
            orjson.dumps(whole_answer(self.ctx.route, self.ctx.model, text, finish, usage))
        )

    async def _expansions(
        self, on_text: Callable[[str], None] | None = None
    ) -> AsyncIterator[tuple[int, SubStream]]:
        """Each point's index and expansion, started as soon as its line is read."""
        started = 0
        try:
            async for chunk in self.outline:
                text = delta_text(self.ctx.route, chunk)
                if on_text is not None:
                    on_text(text)
                for _ in self.reader.feed(text):
                    yield self._expand(started)
                    started += 1
            for _ in self.reader.close():
                yield self._expand(started)
        finally:
            self.outline.close()

    def _expand(self, index: int) -> tuple[int, SubStream]:
        body = {
            **sampling(self.ctx),
            "messages": expand_messages(self.question, self.points[index]),
            "max_tokens": self.caps[index],
            # One paragraph per point; min_tokens, because a small model may open with a
            # blank line, which would otherwise end the point empty.
            "stop": ["\n\n"],
            "min_tokens": 4,
        }
        return index, self.sub.stream(body, budget_s=self.settings.point_budget_s)

    def _outline_body(self) -> dict[str, Any]:
        return {
            **sampling(self.ctx),
            "temperature": 0,
            # Small models loop on a list ("Use a broom ...", five times): penalising
            # repeats (vLLM's repetition_penalty) keeps the points distinct.
            "repetition_penalty": 1.2,
            "presence_penalty": 0.5,
            "messages": skeleton_messages(self.question),
            "max_tokens": self.settings.skeleton_tokens,
            "structured_outputs": {"regex": skeleton_regex(MIN_POINTS, self.settings.max_points)},
        }


LINE_TOKENS = 8.0
"""Tokens of an outline line before any outline was seen ("3. Keep surfaces clear\n")."""
MIN_POINT_TOKENS = 16


def staggered_caps(total: int, points: float, line_tokens: float, count: int) -> list[int]:
    """Token caps of up to ``count`` points, so that the points would all end together.

    Point k starts when the outline's line k is complete, one line (``line_tokens``
    decode steps) after point k-1, while every started point decodes in the same batch.
    So point k gets ``line_tokens`` fewer tokens than point k-1: the last point, which
    starts when the outline ends, is the critical path, and is shortest. For ``points``
    expected points, the caps sum to ``total``, the answer's cap as a direct answer has it;
    points past the total get ``MIN_POINT_TOKENS`` (their tokens are counted in usage).
    """
    points = max(points, 1.0)
    first = total / points + line_tokens * (points - 1) / 2
    caps: list[int] = []
    left = total
    for k in range(count):
        cap = max(MIN_POINT_TOKENS, min(round(first - k * line_tokens), left))
        caps.append(cap)
        left = max(left - cap, 0)
    return caps


def _heading(index: int, point: str) -> str:
    return ("\n\n" if index else "") + f"{index + 1}. {point}: "
