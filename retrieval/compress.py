"""The ``compress`` stage: shorter prompts where that saves more prefill than it costs.

For a chat request whose prompt is long, the documents pasted into it (the middle of the
last user turn, long earlier user turns) are cut to the sentences the question needs
(``retrieval/select.py``), within a token budget set by a ratio or a token count.
System prompts, the instruction and the question, protected spans and the messages the
caller lists in ``keep_messages`` are never altered (``retrieval/prompt.py``,
``retrieval/spans.py``).

Conversations (``summarize``): every earlier turn is sent in the form it was given once,
remembered per tenant, model and text (``retrieval/turns.py``): the current turn as it was
compressed, an older turn without one as its summary (``retrieval/summarize.py``:
extractive, or the backend model's through sub-requests where that pays). Later requests
of the conversation then begin with exactly the bytes the request before sent, so vLLM's
prefix cache keeps hitting, and each turn is summarized once.

Cost-aware: the stage predicts the prefill time compression saves (the shared backend
profile) and its own time (an average of its measured time per 1,000 prompt tokens, kept
from its own traffic), and skips prompts where the saving is not ``min_payoff`` times the
cost (a model summary's predicted backend time counts, shared over ``summary_reuse``
requests; a remembered form costs nothing and is sent even when the rest does not pay).
Until the profile is calibrated it assumes a fast backend
(``uncalibrated_prefill_tps``), which under-predicts the saving. The outcome goes out in
the ``x-leangate-compress`` header and in ``/metrics``. Any failure or overrun fails open
(the pipeline's guard forwards the request unchanged).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from leangate.cache.intermediate import IntermediateCache
from leangate.middleware.context import RequestContext, Result
from leangate.middleware.pipeline import Handler
from leangate.middleware.services import Services

from .payoff import DEFAULT_ANSWER_TOKENS, OwnCost, net_saving, predicted_saving
from .prompt import Plan, budget, part_key, plan, rebuild, segments_by_part
from .select import Selection, Selector, SelectSettings
from .summarize import (
    ExtractiveSettings,
    LlmSettings,
    add_fact_bonus,
    bounded,
    extractive,
    llm_form,
)
from .turns import FORM_KIND, Earlier, earlier_turns, form_key, with_forms

HEADER = "x-leangate-compress"
KEPT_KIND = "compress-kept"
LLM_PROMPT_TOKENS = 90
"""The summary instructions' tokens, added to every piece the model summarizes."""
log = logging.getLogger(__name__)


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
    summarize: bool = True
    """Conversations: an earlier user message or answer of at least ``min_turn_tokens``,
    older than the last ``keep_recent_turns`` turns, is replaced in place by its summary,
    made once per tenant, model and text and then sent byte for byte by every later
    request (``retrieval/turns.py``), and the current turn, once compressed, is sent the
    same way again; so the conversation's prefix stays the one vLLM cached. Off: long
    earlier user messages are cut for each new question, as documents are."""
    summarizer: Literal["extractive", "llm"] = "extractive"
    """``extractive``: the turn's own sentences (a few milliseconds); ``llm``: the backend
    model summarizes it, in chunks at once, when its predicted time pays for itself over
    ``summary_reuse`` requests (else, and on any failure, extractive)."""
    keep_recent_turns: int = Field(1, ge=0, le=1000)
    """The last turns before the current one whose messages are sent as they are (unless
    they already have a form): the previous answer stays whole for a follow-up."""
    min_turn_tokens: int = Field(150, ge=1)
    """A shorter earlier message is sent as it is."""
    summary_ratio: float = Field(5.0, gt=1.0, le=50.0)
    """An earlier turn's summary is about this many times shorter (hard spans always
    kept), and so is the current turn of a conversation (a chat with earlier turns), whose
    form every later request resends; a single message is cut by ``ratio``."""
    summary_max_tokens: int = Field(400, ge=16)
    """The most tokens of a summary, besides the hard spans it must carry."""
    fact_weight: float = Field(6.0, ge=0)
    """Bonus of a sentence stating a number or a name in the user's own voice (I, my, we,
    please, note, ...), in summaries and in the current turn while ``summarize`` is on."""
    summary_reuse: float = Field(4.0, ge=1.0)
    """Requests a summary is expected to serve: the model's summary pays when its predicted
    time is under the prefill it saves over these, divided by ``min_payoff``."""
    llm_chunk_tokens: int = Field(600, ge=32)
    """The model summarizes a long turn in pieces of this many tokens, all at once."""
    llm_summary_tokens: int = Field(96, ge=8, le=2048)
    """The most tokens the model writes per piece."""
    llm_timeout_s: float = Field(60.0, gt=0)
    """A model summary that takes longer is abandoned (extractive instead)."""
    summary_ttl_s: float = Field(86_400.0, gt=0)
    """How long a turn's form is remembered: a conversation resumed later than this gets
    new summaries (and one cold prefix)."""
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
    llm_s: float = 0.0
    """Predicted backend time of the model summaries this request would make."""

    def header(self) -> str:
        return f"skipped; reason={self.reason}; tokens_before={self.before}"


@dataclass(slots=True)
class Work:
    """What a request may have compressed: its current turn (``found``, budgeted over
    ``scope`` tokens) and, in a conversation, its earlier turns: ``known`` forms (sent as
    remembered, at no cost), ``new`` ones to summarize now (``llm``: by the model)."""

    found: Plan | None
    scope: int
    ratio: float
    earlier: list[Earlier] = field(default_factory=list)
    known: dict[int, str] = field(default_factory=dict)
    new: list[Earlier] = field(default_factory=list)
    llm: set[int] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return self.found is None and not self.known and not self.new


@dataclass(frozen=True, slots=True)
class Summaries:
    """What became of a request's earlier turns, for the header."""

    new: int = 0
    reused: int = 0
    llm: int = 0
    fallback: int = 0

    def fields(self) -> str:
        if not self.new and not self.reused:
            return ""
        text = f"; summaries_new={self.new}; summaries_reused={self.reused}"
        if self.llm or self.fallback:
            text += f"; summaries_llm={self.llm}; summaries_fallback={self.fallback}"
        return text


@dataclass(frozen=True, slots=True)
class Outcome:
    messages: list[dict[str, Any]]
    before: int
    after: int
    method: str
    seconds: float
    summaries: Summaries = Summaries()

    def header(self, reason: str) -> str:
        return (
            f"compressed; reason={reason}; method={self.method}; tokens_before={self.before}; "
            f"tokens_after={self.after}; ms={self.seconds * 1000:.1f}{self.summaries.fields()}"
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
        messages = chat_messages(ctx)
        if messages is None:
            return await call_next(ctx)
        started = time.perf_counter()
        before = self.services.tokenizer.estimate_messages(ctx.model, messages)
        work = None
        if self.settings.min_prompt_tokens <= before <= context_length(ctx):
            exclude = kept_messages(ctx, len(messages))
            work = await asyncio.to_thread(self._work, ctx.model, messages, exclude)
            await self._known_forms(ctx, work)
        decision = self.decide(ctx, before, work)
        if work is None or (not decision.run and not work.known):
            ctx.response_headers[HEADER] = decision.header()
            self.services.metrics.compress_decided(self.name, False, decision.reason)
            return await call_next(ctx)
        if decision.run:
            outcome = await self._compress(ctx, messages, work, before, started)
            reason = decision.reason
        else:  # remembered forms cost nothing and keep the prefix vLLM cached
            outcome = self._known_only(ctx, messages, work, before, started)
            reason = f"{decision.reason}+known"
        ctx.replace_body({**ctx.body, "messages": outcome.messages})
        ctx.response_headers[HEADER] = outcome.header(reason)
        self.services.metrics.compress_decided(self.name, True, reason)
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

    def _plan(
        self, model: str, messages: list[dict[str, Any]], exclude: Collection[int] = ()
    ) -> Plan | None:
        tokenizer = self.services.tokenizer
        return plan(
            messages,
            lambda text: tokenizer.estimate(model, text),
            min_block_tokens=self.settings.min_block_tokens,
            instruction_max_tokens=self.settings.instruction_max_tokens,
            exclude=exclude,
            earlier_turns=not self.settings.summarize,
        )

    def _work(self, model: str, messages: list[dict[str, Any]], exclude: set[int]) -> Work:
        """The request's compressible parts (in a worker thread: segmenting is CPU work)."""
        s = self.settings
        tokenizer = self.services.tokenizer
        found = self._plan(model, messages, exclude)
        if not s.summarize or len(messages) < 2:
            return Work(found, tokenizer.estimate_messages(model, messages), s.ratio)
        earlier = earlier_turns(
            messages,
            lambda text: tokenizer.estimate(model, text),
            min_turn_tokens=s.min_turn_tokens,
            keep_recent_turns=s.keep_recent_turns,
            exclude=exclude,
        )
        scoped = [m for m in messages[:-1] if m.get("role") == "system"] + messages[-1:]
        # a conversation's turn is resent by every later request: cut as its summaries are
        ratio = s.summary_ratio if len(scoped) < len(messages) else s.ratio
        return Work(found, tokenizer.estimate_messages(model, scoped), ratio, earlier)

    async def _known_forms(self, ctx: RequestContext, work: Work) -> None:
        """The remembered forms of the earlier turns; which others to summarize now, and
        which of those by the model (where it pays)."""
        if not work.earlier:
            return
        keys = [form_key(ctx.model, e.role, e.text) for e in work.earlier]
        stored = await asyncio.gather(*(self.memory.get(ctx.tenant, FORM_KIND, k) for k in keys))
        for turn, value in zip(work.earlier, stored, strict=True):
            if isinstance(value, str):
                work.known[turn.index] = value
            elif not turn.recent:
                work.new.append(turn)
        if self.settings.summarizer == "llm":
            work.llm = {t.index for t in work.new if self._llm_pays(ctx, t.tokens)}

    def decide(self, ctx: RequestContext, before: int, work: Work | None) -> Decision:
        s = self.settings
        if before < s.min_prompt_tokens:
            return Decision(False, "short", before)
        if before > context_length(ctx):
            # the client gets the backend's own error, as without the stage
            return Decision(False, "over-context", before)
        if work is None or work.empty:
            return Decision(False, "nothing-to-compress", before)
        after = self._predicted_after(ctx, before, work)
        if after >= before:
            return Decision(False, "at-target", before)
        llm_s = sum(self._llm_cost_s(ctx, t.tokens) for t in work.new if t.index in work.llm)
        if s.mode == "always":
            return Decision(True, "policy-always", before, llm_s)
        # a model summary is made once and serves ``summary_reuse`` requests: its share
        cost_s = self.cost.predict_s(before) + llm_s / s.summary_reuse
        saved_s, calibrated = predicted_saving(
            self.services.profile,
            ctx.answer_cap(DEFAULT_ANSWER_TOKENS),
            before,
            after,
            s.uncalibrated_prefill_tps,
        )
        if saved_s < s.min_payoff * cost_s:
            return Decision(False, "no-gain" if calibrated else "no-gain-uncalibrated", before)
        return Decision(True, "pays" if calibrated else "pays-uncalibrated", before, llm_s)

    def _predicted_after(self, ctx: RequestContext, before: int, work: Work) -> int:
        """The prompt's tokens once known forms, new summaries (at ``summary_ratio``) and
        the current turn's budget are in."""
        estimate = self.services.tokenizer.estimate
        after = before
        by_index = {t.index: t for t in work.earlier}
        for index, text in work.known.items():
            after -= by_index[index].tokens - estimate(ctx.model, text)
        for turn in work.new:
            after -= turn.tokens - self._summary_tokens(turn.tokens)
        if work.found is not None:
            allowed = budget(work.found, work.scope, **self._target(work.ratio))
            after -= max(work.found.compressible_tokens - allowed, 0)
        return after

    def _summary_tokens(self, tokens: int) -> int:
        s = self.settings
        return min(math.ceil(tokens / s.summary_ratio), s.summary_max_tokens)

    def _llm_cost_s(self, ctx: RequestContext, tokens: int) -> float:
        """The backend's predicted time to summarize ``tokens`` of text: its pieces at once,
        then, for several, the reduce."""
        s = self.settings
        pieces = max(math.ceil(tokens / s.llm_chunk_tokens), 1)
        each = math.ceil(tokens / pieces) + LLM_PROMPT_TOKENS
        profile = self.services.profile
        cost = profile.predict(each, s.llm_summary_tokens, parallel=pieces)
        if pieces > 1:
            joined = pieces * s.llm_summary_tokens + LLM_PROMPT_TOKENS
            cost += profile.predict(joined, s.llm_summary_tokens)
        return cost

    def _llm_pays(self, ctx: RequestContext, tokens: int) -> bool:
        """The model's summary of a turn is worth its backend time: always with ``mode:
        always``; else when the prefill it saves over ``summary_reuse`` requests is
        ``min_payoff`` times that time. A summary's tokens are about the extractive one's,
        so this is against sending the turn whole."""
        s = self.settings
        if s.mode == "always":
            return True
        saved_s, _ = predicted_saving(
            self.services.profile,
            ctx.answer_cap(DEFAULT_ANSWER_TOKENS),
            tokens,
            self._summary_tokens(tokens),
            s.uncalibrated_prefill_tps,
        )
        return saved_s * s.summary_reuse >= s.min_payoff * self._llm_cost_s(ctx, tokens)

    def _target(self, ratio: float | None = None) -> dict[str, Any]:
        return {"ratio": ratio or self.settings.ratio, "target_tokens": self.settings.target_tokens}

    # --- compressing -------------------------------------------------------------------------

    async def _compress(
        self,
        ctx: RequestContext,
        messages: list[dict[str, Any]],
        work: Work,
        before: int,
        started: float,
    ) -> Outcome:
        forms = dict(work.known)
        made, summaries = await self._summaries(ctx, work)
        forms.update(made)
        method: list[str] = []
        compressed = [dict(m) for m in messages]
        if work.found is not None:
            method, compressed = await self._current(ctx, messages, work)
        if forms:
            method.append("summary")
        compressed = with_forms(compressed, forms)
        await self._remember(ctx, messages, compressed, work, made)
        after = self.services.tokenizer.estimate_messages(ctx.model, compressed)
        seconds = time.perf_counter() - started
        self.cost.measured(seconds, before)
        return Outcome(compressed, before, after, "+".join(method), seconds, summaries)

    def _known_only(
        self,
        ctx: RequestContext,
        messages: list[dict[str, Any]],
        work: Work,
        before: int,
        started: float,
    ) -> Outcome:
        compressed = with_forms(messages, work.known)
        after = self.services.tokenizer.estimate_messages(ctx.model, compressed)
        seconds = time.perf_counter() - started
        return Outcome(
            compressed, before, after, "summary", seconds, Summaries(reused=len(work.known))
        )

    async def _current(
        self, ctx: RequestContext, messages: list[dict[str, Any]], work: Work
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """The current turn (and, without ``summarize``, long earlier user turns) cut to
        what the question needs, budgeted over the work's ``scope`` tokens."""
        found, scope = work.found, work.scope
        assert found is not None
        selector = await asyncio.to_thread(
            Selector, found.question, found.candidates, self.settings.select
        )
        if self.settings.dense:
            await self._add_dense(selector, found)
        selection = await asyncio.to_thread(self._choose, selector, found, scope, work.ratio)
        method, keep = list(selection.method), selection.keep
        earlier: dict[int, set[int]] = {}
        if self.settings.stable_prefix:
            earlier = await self._earlier(ctx, found, keep)
        if earlier:
            method.append("stable")
            keep = self._extras_that_pay(ctx, messages, found, keep, earlier, selector, scope)
        return method, rebuild(messages, found, keep, earlier)

    async def _summaries(self, ctx: RequestContext, work: Work) -> tuple[dict[int, str], Summaries]:
        """The new summaries of earlier turns, by message: the model's where chosen (each
        falling back to extractive when it fails), extractive for the others."""
        made: dict[int, str] = {}
        fallback = 0
        by_model = [t for t in work.new if t.index in work.llm]
        if by_model:
            results = await asyncio.gather(
                *(self._llm_summary(ctx, t) for t in by_model), return_exceptions=True
            )
            for turn, result in zip(by_model, results, strict=True):
                if isinstance(result, str):
                    made[turn.index] = result
                elif isinstance(result, Exception):
                    fallback += 1
                    log.info("model summary failed, extractive instead: %r", result)
                else:  # a BaseException (cancellation) is not ours to swallow
                    raise result
        rest = [t for t in work.new if t.index not in made]
        if rest:
            texts = await asyncio.to_thread(self._extractive_all, ctx.model, rest)
            made.update(zip((t.index for t in rest), texts, strict=True))
        return made, Summaries(
            new=len(made), reused=len(work.known), llm=len(by_model) - fallback, fallback=fallback
        )

    def _extractive_all(self, model: str, turns: list[Earlier]) -> list[str]:
        tokenizer = self.services.tokenizer
        s = self.settings
        settings = ExtractiveSettings(
            ratio=s.summary_ratio,
            max_tokens=s.summary_max_tokens,
            instruction_max_tokens=s.instruction_max_tokens,
            fact_weight=s.fact_weight,
            select=s.select,
        )
        return [
            extractive(t.text, t.question, lambda x: tokenizer.estimate(model, x), settings)
            for t in turns
        ]

    async def _llm_summary(self, ctx: RequestContext, turn: Earlier) -> str:
        s = self.settings
        tokenizer = self.services.tokenizer
        settings = LlmSettings(s.llm_chunk_tokens, s.llm_summary_tokens, s.summary_max_tokens)
        call = llm_form(
            turn.text,
            turn.question,
            lambda x: tokenizer.estimate(ctx.model, x),
            ctx.subrequests.gather,
            settings,
            s.instruction_max_tokens,
        )
        return await bounded(call, s.llm_timeout_s)

    async def _remember(
        self,
        ctx: RequestContext,
        messages: list[dict[str, Any]],
        compressed: list[dict[str, Any]],
        work: Work,
        made: dict[int, str],
    ) -> None:
        """Keep the new summaries, and the current turn as it is sent now, as the forms
        later requests of the conversation send (``retrieval/turns.py``)."""
        if not self.settings.summarize:
            return
        ttl = self.settings.summary_ttl_s
        by_index = {t.index: t for t in work.new}
        for index, text in made.items():
            turn = by_index[index]
            await self.memory.put(
                ctx.tenant, FORM_KIND, form_key(ctx.model, turn.role, turn.text), text, ttl
            )
        last = len(messages) - 1
        found = work.found
        if found is None or all(part.message != last for part in found.parts):
            return
        original = str(messages[last].get("content") or "")
        if self.services.tokenizer.estimate(ctx.model, original) < self.settings.min_turn_tokens:
            return
        key = form_key(ctx.model, "user", original)
        await self.memory.put(ctx.tenant, FORM_KIND, key, compressed[last]["content"], ttl)

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

    def _choose(
        self, selector: Selector, found: Plan, before: int, ratio: float | None = None
    ) -> Selection:
        if self.settings.select.hop_sources:
            selector.second_hop()
        if self.settings.summarize:  # the current turn is the form later requests send
            add_fact_bonus(selector, found.candidates, self.settings.fact_weight)
        return selector.choose(budget(found, before, **self._target(ratio)))


def context_length(ctx: RequestContext) -> float:
    """The served model's context window, as its replicas list it (unknown: no limit)."""
    for card in ctx.backend.model_cards():
        if card.get("id") == ctx.model:
            length = card.get("max_model_len")
            return float(length) if isinstance(length, int | float) and length > 0 else math.inf
    return math.inf


def kept_messages(ctx: RequestContext, count: int) -> set[int]:
    """The messages the caller asked to be sent exactly as given (``keep_messages``)."""
    return {i for i in ctx.options.keep_messages or () if i < count}


def chat_messages(ctx: RequestContext) -> list[dict[str, Any]] | None:
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
