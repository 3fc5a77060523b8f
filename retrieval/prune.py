"""The ``prune`` stage: token-level pruning of pasted text by self-information.

The compressible parts of a chat (``retrieval/prompt.py:plan``: the documents pasted into
the last user turn, long earlier user turns) are scored by a scorer model through vLLM's
``prompt_logprobs``, one sub-request per part, all at once; then about ``share`` of the
tokens of their sentences go, the most predictable words first (``retrieval/tokens.py``).
Locked text (system, assistant and tool messages, the instruction and the question),
protected spans and the messages the caller lists in ``keep_messages`` are never altered.
It composes with ``compress``: after it in a chain, it thins the sentences compression
kept.

Cost-aware: scoring costs the scorer's prefill of the scored text. With the request's own
model as the scorer that is the very prefill pruning tries to save, and more: the backend
profile predicts both, and the stage skips (``scorer-not-cheaper``). A smaller scorer
model pays when its measured time per 1,000 tokens (an average of its scoring calls,
from ``scorer_prior_ms_per_1k`` until measured) is under the prefill saved by
``min_payoff``. The outcome goes out in the ``x-leangate-prune`` header and in
``/metrics`` (the compression metrics, under this stage's name); any failure fails open.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from leangate.middleware.context import RequestContext, Result
from leangate.middleware.pipeline import Handler
from leangate.middleware.services import Services

from .compress import chat_messages, context_length, kept_messages
from .payoff import DEFAULT_ANSWER_TOKENS, OwnCost, net_saving, predicted_saving
from .prompt import Part, Plan, plan
from .spans import protected_spans
from .tokens import pieces_of, prune, scoring_body

HEADER = "x-leangate-prune"


class PruneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "always"] = "auto"
    """``auto``: prune when the cost check says it pays; ``always``: every prompt over
    ``min_prompt_tokens`` (tests, measurements)."""
    scorer_model: str | None = None
    """The served model whose ``prompt_logprobs`` score the text; default the request's
    own, which never pays in ``auto`` (its scoring is the prefill it would save)."""
    share: float = Field(0.3, gt=0.0, lt=1.0)
    """The share of the compressible text's tokens to drop (headings and protected spans
    stay, so more of the sentences' words go)."""
    min_prompt_tokens: int = Field(500, ge=0)
    """Shorter prompts are left alone."""
    min_block_tokens: int = Field(200, ge=1)
    """An earlier user message this long counts as a compressible document."""
    instruction_max_tokens: int = Field(100, ge=0)
    """The last user turn's first paragraph, up to this long, is its instruction: kept."""
    min_payoff: float = Field(2.0, gt=0)
    """Prune only when the predicted prefill saving is this many times the scoring time."""
    scorer_prior_ms_per_1k: float = Field(20.0, gt=0)
    """A scorer other than the request's model: its time per 1,000 tokens until measured."""
    uncalibrated_prefill_tps: float = Field(5000.0, gt=0)
    """The prefill speed assumed before the backend profile is calibrated."""


class PruneStage:
    """Drops the most predictable words of pasted text, scored by a scorer model's
    ``prompt_logprobs``, when a cheap enough scorer makes it pay."""

    Settings: ClassVar[type[BaseModel]] = PruneSettings
    default_budget_ms: ClassVar[float | None] = 500.0
    needs: ClassVar[frozenset[str]] = frozenset({"tokenizer", "profile"})

    def __init__(self, name: str, settings: PruneSettings, services: Services) -> None:
        self.name = name
        self.settings = settings
        self.services = services
        self.scorer_cost: dict[str, OwnCost] = {}
        """Measured scoring time per scorer model other than the request's."""

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        messages = chat_messages(ctx)
        if messages is None:
            return await call_next(ctx)
        started = time.perf_counter()
        before = self.services.tokenizer.estimate_messages(ctx.model, messages)
        found, reason = await self._plan(ctx, messages, before)
        scorer = self.settings.scorer_model or ctx.model
        if found is not None:
            reason = self.decide(ctx, found, before, scorer)
        if found is None or not (reason.startswith("pays") or reason == "policy-always"):
            ctx.response_headers[HEADER] = f"skipped; reason={reason}; tokens_before={before}"
            self.services.metrics.compress_decided(self.name, False, reason)
            return await call_next(ctx)
        pruned, dropped = await self._prune(ctx, messages, found, scorer)
        after = self.services.tokenizer.estimate_messages(ctx.model, pruned)
        seconds = time.perf_counter() - started
        ctx.replace_body({**ctx.body, "messages": pruned})
        ctx.response_headers[HEADER] = (
            f"pruned; reason={reason}; scorer={scorer}; dropped={dropped}; "
            f"tokens_before={before}; tokens_after={after}; ms={seconds * 1000:.1f}"
        )
        metrics = self.services.metrics
        metrics.compress_decided(self.name, True, reason)
        metrics.compress_done(self.name, before, after, seconds)
        answer = ctx.answer_cap(DEFAULT_ANSWER_TOKENS)
        tps = self.settings.uncalibrated_prefill_tps
        # ``seconds`` holds the scoring calls: a loss when they cost more than they saved
        saved = net_saving(self.services.profile, answer, before, after, seconds, tps)
        metrics.stage_saved(self.name, saved)
        return await call_next(ctx)

    async def _plan(
        self, ctx: RequestContext, messages: list[dict[str, Any]], before: int
    ) -> tuple[Plan | None, str]:
        s = self.settings
        if before < s.min_prompt_tokens:
            return None, "short"
        if before > context_length(ctx):
            return None, "over-context"
        tokenizer = self.services.tokenizer
        found = await asyncio.to_thread(
            plan,
            messages,
            lambda text: tokenizer.estimate(ctx.model, text),
            min_block_tokens=s.min_block_tokens,
            instruction_max_tokens=s.instruction_max_tokens,
            exclude=kept_messages(ctx, len(messages)),
        )
        return found, "nothing-to-prune"

    def decide(self, ctx: RequestContext, found: Plan, before: int, scorer: str) -> str:
        """Why the request is pruned (``pays…``, ``policy-always``) or not."""
        s = self.settings
        if s.mode == "always":
            return "policy-always"
        estimate = self.services.tokenizer.estimate
        scored = sum(estimate(ctx.model, part.text) for part in found.parts)
        after = before - int(s.share * found.compressible_tokens)
        profile = self.services.profile
        saved_s, calibrated = predicted_saving(
            profile,
            ctx.answer_cap(DEFAULT_ANSWER_TOKENS),
            before,
            after,
            s.uncalibrated_prefill_tps,
        )
        if scorer == ctx.model:
            cost_s = profile.predict(scored, 1)
        else:
            cost_s = self._cost(scorer).predict_s(scored)
        if saved_s < s.min_payoff * cost_s:
            return "scorer-not-cheaper" if scorer == ctx.model else "no-gain"
        return "pays" if calibrated else "pays-uncalibrated"

    def _cost(self, scorer: str) -> OwnCost:
        cost = self.scorer_cost.get(scorer)
        if cost is None:
            cost = self.scorer_cost[scorer] = OwnCost(self.settings.scorer_prior_ms_per_1k)
        return cost

    async def _prune(
        self, ctx: RequestContext, messages: list[dict[str, Any]], found: Plan, scorer: str
    ) -> tuple[list[dict[str, Any]], int]:
        """The messages with every part's sentences thinned, and the tokens dropped."""
        bodies = [scoring_body(part.text, scorer) for part in found.parts]
        started = time.perf_counter()
        answers = await ctx.subrequests.gather(bodies, route="completions")
        if scorer != ctx.model:
            scored = sum(self.services.tokenizer.estimate(scorer, p.text) for p in found.parts)
            self._cost(scorer).measured(time.perf_counter() - started, scored)
        out = [dict(m) for m in messages]
        dropped = 0
        for part, answer in zip(found.parts, answers, strict=True):
            text, count = await asyncio.to_thread(self._thin, part, answer)
            out[part.message]["content"] = text
            dropped += count
        return out, dropped

    def _thin(self, part: Part, answer: dict[str, Any]) -> tuple[str, int]:
        return thin(part, answer, self.settings.share)


def thin(part: Part, answer: dict[str, Any], share: float) -> tuple[str, int]:
    """``part``'s text without about ``share`` of its open segments' tokens (the stage's
    promise; headings and hard segments stay, so more of the sentences go), by the scorer's
    ``answer`` for that text (unchanged when its tokens do not spell the text back), and
    the tokens dropped."""
    pieces = pieces_of(part.text, answer)
    if pieces is None:
        return part.text, 0
    free = [seg for number, seg in enumerate(part.segments) if number not in part.locked]
    regions = [(s.start, s.end) for s in free if s.kind == "sentence" and not s.hard]
    counted = [(s.start, s.end) for s in free]
    return prune(part.text, pieces, regions, protected_spans(part.text), share, counted)
