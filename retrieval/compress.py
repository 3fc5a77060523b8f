"""The ``compress`` stage: shorter prompts where that saves more prefill than it costs.

For a chat request whose prompt is long, the documents pasted into it (the middle of the
last user turn, long earlier user turns) are cut to the sentences the question needs
(``retrieval/select.py``), within a token budget set by a ratio or a token count.
System prompts, the instruction and the question, and protected spans are never altered
(``retrieval/prompt.py``, ``retrieval/spans.py``).

Cost-aware: the stage predicts the prefill time compression saves (the shared backend
profile) and its own time (an average of its measured time per 1,000 prompt tokens, kept
from its own traffic), and skips prompts where the saving is not ``min_payoff`` times the
cost. Until the profile is calibrated it assumes a fast backend
(``uncalibrated_prefill_tps``), which under-predicts the saving. The outcome goes out in
the ``x-leangate-compress`` header and in ``/metrics``. Any failure or overrun fails open
(the pipeline's guard forwards the request unchanged).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from leangate.cache.intermediate import IntermediateCache
from leangate.middleware.context import RequestContext, Result
from leangate.middleware.pipeline import Handler
from leangate.middleware.services import Services

from .payoff import DEFAULT_ANSWER_TOKENS, OwnCost, net_saving, predicted_saving
from .prompt import Plan, budget, part_key, plan, rebuild, segments_by_part
from .select import Selection, Selector, SelectSettings

HEADER = "x-leangate-compress"
KEPT_KIND = "compress-kept"


class CompressSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "always"] = "auto"
    """``auto``: compress when it pays; ``always``: every prompt over ``min_prompt_tokens``."""
    ratio: float = Field(4.0, gt=1.0, le=50.0)
    """Target: the prompt shrinks by this factor."""
    target_tokens: int | None = Field(None, ge=1)
    """Target by count instead of ratio (never more than the prompt)."""
    min_prompt_tokens: int = Field(1000, ge=0)
    """Shorter prompts (by the tokenizer's estimate) are left alone."""
    min_block_tokens: int = Field(200, ge=1)
    """An earlier user message this long is a compressible document."""
    instruction_max_tokens: int = Field(100, ge=0)
    """The last turn's first paragraph, up to this long, is the instruction (kept)."""
    dense: bool = False
    """Add the shared embedder's scores for the best ``dense_candidates`` sentences. Off by
    default: measured on the tune part of the HotpotQA sample, it cost 60 to 110 ms per
    1,000 prompt tokens on 2 cores and kept fewer supporting sentences (0.87 against 0.92)."""
    dense_candidates: int = Field(20, ge=1, le=200)
    """How many of the best sentences get dense scores (with ``dense``)."""
    min_payoff: float = Field(2.0, ge=0)
    """Compress only when the predicted prefill saving is this many times the predicted
    compressor time."""
    prior_ms_per_1k: float = Field(20.0, gt=0)
    """The compressor's time per 1,000 prompt tokens before it has measured its own."""
    uncalibrated_prefill_tps: float = Field(5000.0, gt=0)
    """The prefill speed assumed until the backend profile is calibrated (fast, so the saving
    is under-predicted)."""
    select: SelectSettings = Field(default_factory=SelectSettings)
    """Finer weights of the sentence selection."""
    stable_prefix: bool = True
    """A text seen before (per tenant and model) keeps what it kept then, in place, so the
    prompt's prefix is the one vLLM cached. Off: every request is compressed for its own
    question alone (no prefix reuse)."""
    stable_extras: bool = False
    """With ``stable_prefix``: after the earlier text, add the best sentences the new
    question needs, as long as the backend profile predicts the request no slower than
    the whole prompt with a warm prefix. Off by default: the profile under-predicted their
    cost here (measured on the HotpotQA warm case: 0.80x with them, 1.32x without),
    probably because its prefill model has no term for the cached context they extend."""


@dataclass(frozen=True, slots=True)
class Decision:
    run: bool
    reason: str
    before: int = 0

    def header(self) -> str:
        return f"skipped; reason={self.reason}; tokens_before={self.before}"


@dataclass(frozen=True, slots=True)
class Outcome:
    messages: list[dict[str, Any]]
    before: int
    after: int
    method: str
    seconds: float

    def header(self, reason: str) -> str:
        return (
            f"compressed; reason={reason}; method={self.method}; tokens_before={self.before}; "
            f"tokens_after={self.after}; ms={self.seconds * 1000:.1f}"
        )


class CompressStage:
    Settings: ClassVar[type[BaseModel]] = CompressSettings
    default_budget_ms: ClassVar[float | None] = 500.0

    @classmethod
    def needs_for(cls, settings: CompressSettings) -> frozenset[str]:
        """The tokenizer; the profile for the cost check; the embedder only with dense
        scores on."""
        needs = {"tokenizer", "profile"} if settings.mode == "auto" else {"tokenizer"}
        if settings.dense:
            needs.add("embedder")
        return frozenset(needs)

    def __init__(self, name: str, settings: CompressSettings, services: Services) -> None:
        self.name = name
        self.settings = settings
        self.services = services
        self.memory = IntermediateCache(services.cache)
        self.cost = OwnCost(settings.prior_ms_per_1k)

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        messages = _messages(ctx)
        if messages is None:
            return await call_next(ctx)
        started = time.perf_counter()
        before = self.services.tokenizer.estimate_messages(ctx.model, messages)
        found = None
        if self.settings.min_prompt_tokens <= before <= _context_length(ctx):
            found = await asyncio.to_thread(self._plan, ctx.model, messages)
        decision = self.decide(ctx, before, found)
        if found is None or not decision.run:
            ctx.response_headers[HEADER] = decision.header()
            self.services.metrics.compress_decided(self.name, False, decision.reason)
            return await call_next(ctx)
        outcome = await self._compress(ctx, messages, found, before, started)
        ctx.replace_body({**ctx.body, "messages": outcome.messages})
        ctx.response_headers[HEADER] = outcome.header(decision.reason)
        self.services.metrics.compress_decided(self.name, True, decision.reason)
        self.services.metrics.compress_done(
            self.name, outcome.before, outcome.after, outcome.seconds
        )
        saved = net_saving(
            self.services.profile,
            ctx.answer_cap(DEFAULT_ANSWER_TOKENS),
            outcome.before,
            outcome.after,
            outcome.seconds,
            self.settings.uncalibrated_prefill_tps,
        )
        self.services.metrics.stage_saved(self.name, saved)
        return await call_next(ctx)

    # --- deciding ----------------------------------------------------------------------------

    def _plan(self, model: str, messages: list[dict[str, Any]]) -> Plan | None:
        tokenizer = self.services.tokenizer
        return plan(
            messages,
            lambda text: tokenizer.estimate(model, text),
            min_block_tokens=self.settings.min_block_tokens,
            instruction_max_tokens=self.settings.instruction_max_tokens,
        )

    def decide(self, ctx: RequestContext, before: int, found: Plan | None) -> Decision:
        s = self.settings
        if before < s.min_prompt_tokens:
            return Decision(False, "short", before)
        if before > _context_length(ctx):
            # the client gets the backend's own error, as without the stage
            return Decision(False, "over-context", before)
        if found is None:
            return Decision(False, "nothing-to-compress", before)
        after = before - found.compressible_tokens + budget(found, before, **self._target())
        if after >= before:
            return Decision(False, "at-target", before)
        if s.mode == "always":
            return Decision(True, "policy-always", before)
        cost_s = self.cost.predict_s(before)
        saved_s, calibrated = predicted_saving(
            self.services.profile,
            ctx.answer_cap(DEFAULT_ANSWER_TOKENS),
            before,
            after,
            s.uncalibrated_prefill_tps,
        )
        if saved_s < s.min_payoff * cost_s:
            return Decision(False, "no-gain" if calibrated else "no-gain-uncalibrated", before)
        return Decision(True, "pays" if calibrated else "pays-uncalibrated", before)

    def _target(self) -> dict[str, Any]:
        return {"ratio": self.settings.ratio, "target_tokens": self.settings.target_tokens}

    # --- compressing -------------------------------------------------------------------------

    async def _compress(
        self,
        ctx: RequestContext,
        messages: list[dict[str, Any]],
        found: Plan,
        before: int,
        started: float,
    ) -> Outcome:
        selector = await asyncio.to_thread(
            Selector, found.question, found.candidates, self.settings.select
        )
        if self.settings.dense:
            await self._add_dense(selector, found)
        selection = await asyncio.to_thread(self._choose, selector, found, before)
        method, keep = list(selection.method), selection.keep
        earlier: dict[int, set[int]] = {}
        if self.settings.stable_prefix:
            earlier = await self._earlier(ctx, found, keep)
        if earlier:
            method.append("stable")
            keep = self._extras_that_pay(ctx, messages, found, keep, earlier, selector, before)
        compressed = rebuild(messages, found, keep, earlier)
        after = self.services.tokenizer.estimate_messages(ctx.model, compressed)
        seconds = time.perf_counter() - started
        self.cost.measured(seconds, before)
        return Outcome(compressed, before, after, "+".join(method), seconds)

    async def _earlier(
        self, ctx: RequestContext, found: Plan, keep: set[int]
    ) -> dict[int, set[int]]:
        """What earlier requests of this tenant kept of the same texts, by part; a part
        seen for the first time is remembered with what this request keeps of it."""
        chosen = segments_by_part(found, keep)
        keys = [[ctx.model, part_key(found, n)] for n in range(len(found.parts))]
        stored = await asyncio.gather(*(self.memory.get(ctx.tenant, KEPT_KIND, k) for k in keys))
        earlier: dict[int, set[int]] = {}
        for number, (key, value) in enumerate(zip(keys, stored, strict=True)):
            allowed = {i for n, i in found.owners if n == number}
            if isinstance(value, list) and value and set(value) <= allowed:
                earlier[number] = set(value)
            else:
                await self.memory.put(ctx.tenant, KEPT_KIND, key, sorted(chosen[number]))
        return earlier

    def _extras_that_pay(
        self,
        ctx: RequestContext,
        messages: list[dict[str, Any]],
        found: Plan,
        keep: set[int],
        earlier: dict[int, set[int]],
        selector: Selector,
        before: int,
    ) -> set[int]:
        """``keep`` less what it would add to texts seen before, except (``stable_extras``)
        the best of those additions whose prefill still leaves the request no slower than
        the whole prompt with a warm prefix would be (the backend profile's prediction; none
        until the profile is calibrated). The earlier text itself costs nothing: vLLM has
        it."""
        owners = found.owners
        placed = {c for c in keep if owners[c][1] in earlier.get(owners[c][0], {owners[c][1]})}
        extras = sorted(keep - placed, key=lambda c: -selector.scores[c])
        profile = self.services.profile
        if not extras or not profile.calibrated or not self.settings.stable_extras:
            return placed
        tokenizer = self.services.tokenizer
        answer = ctx.answer_cap(DEFAULT_ANSWER_TOKENS)
        question = tokenizer.estimate(ctx.model, found.question)
        base = tokenizer.estimate_messages(ctx.model, rebuild(messages, found, placed, earlier))
        limit = profile.predict(before, answer, cached_tokens=before - question)
        added = 0
        for candidate in extras:
            tokens = found.candidates[candidate].tokens
            cost = profile.predict(base + added + tokens, answer, cached_tokens=base - question)
            if cost > limit:
                break
            placed.add(candidate)
            added += tokens
        return placed

    async def _add_dense(self, selector: Selector, found: Plan) -> None:
        shortlist = selector.shortlist(self.settings.dense_candidates)
        if not shortlist:
            return
        texts = [found.question] + [found.candidates[i].text for i in shortlist]
        vectors = await self.services.embedder.aembed(texts)
        selector.add_dense(shortlist, [float(v) for v in vectors[1:] @ vectors[0]])

    def _choose(self, selector: Selector, found: Plan, before: int) -> Selection:
        if self.settings.select.hop_sources:
            selector.second_hop()
        return selector.choose(budget(found, before, **self._target()))


def _context_length(ctx: RequestContext) -> float:
    """The served model's context window, as its replicas list it (unknown: no limit)."""
    for card in ctx.backend.model_cards():
        if card.get("id") == ctx.model:
            length = card.get("max_model_len")
            return float(length) if isinstance(length, int | float) and length > 0 else math.inf
    return math.inf


def _messages(ctx: RequestContext) -> list[dict[str, Any]] | None:
    """The chat's messages as plain dicts, for requests compression handles."""
    body = ctx.body
    if ctx.route != "chat" or body.get("tools") or body.get("functions"):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    if not all(_plain(m) for m in messages):
        return None
    return [dict(m) for m in messages]


def _plain(message: object) -> bool:
    """A message of text only: no content parts (images), tool calls or tool results."""
    if not isinstance(message, Mapping):
        return False
    if message.get("tool_calls") or message.get("function_call") or message.get("role") == "tool":
        return False
    return isinstance(message.get("content"), str | None)
