"""``leangate bench conversation``: summarized conversations against whole ones.

Data, built here: 10-turn conversations. Turns 1, 2, 4 and 7 paste a document (a HotpotQA
record of ``<data-dir>/hotpotqa/dev_distractor_20.json``: its gold paragraphs and others,
to about 900 tokens, after an instruction, with the record's question last); turns 3, 5
and 9 are MT-bench questions (``<data-dir>/fastchat/mt_bench_question.jsonl``; turn 5 is
turn 3's follow-up); turns 6, 8 and 10 ask back a planted fact. Six facts (an invented
name and an invented number in one sentence) are planted in turns 1, 2 and 4: in the
instruction, between the pasted paragraphs or before the question. The split, fixed
before any result was seen: a conversation is built only from records, MT-bench questions
and fact templates of one part; records and questions go by a hash of their id
(``bench/hotpot.py:is_tune``), templates by their position (even: tune, odd: held out), so
held-out facts are worded as the summarizer's rules never saw. The held-out part has only 5
of the 20 records: its conversations use 4 of them each, in other orders, with other facts.

1. *offline* (all conversations, both parts): the ``compress`` stage's own code in process
   at the policy's settings, in front of a scripted backend that answers every turn with
   the same reply; the prompt it sends at each turn is read back. From turn 6 on:
   ``conversation_token_reduction`` (prompt tokens before over after, summed; the served
   model's tokenizer, with the chat template's 5 tokens a message), its smallest turn
   (``_min``), ``planted_fact_retention`` (planted facts whose name and number are both
   in one earlier message of the sent prompt). Over all turns:
   ``summary_calls_per_old_turn`` (summaries made, over the earlier turns that got one:
   1.0 is once each) and ``old_turn_rewrites_per_turn`` (times an earlier long message
   was sent otherwise than the request before sent it, per such message: each rewrite
   breaks vLLM's cached prefix there). ``_tune`` and ``_holdout`` figures; the unsuffixed
   ones are held out.
2. *llm* (the end-to-end conversations' long turns): each pasted turn summarized by the
   backend model (``retrieval/summarize.py:llm_summary``, its pieces at once) and
   extractively: ``llm_`` and ``extractive_`` fact retention, token reduction and time,
   and ``llm_refused_share`` (summaries refused: a number the source does not hold,
   empty, too long; the stage then falls back to extractive).
3. *end to end* on the real backend: the same conversations turn by turn, direct to vLLM
   and through a proxy running the ``compress`` stage (whose backend is a relay here that
   keeps what the proxy sends), the arms alternating in order, ``max_tokens``
   ``--max-tokens`` at temperature 0. Both arms resend the same transcript: the direct
   arm's answers. A nonce in each arm's system prompt keeps conversations apart in vLLM's
   cache. vLLM's own counters (``vllm:prefix_cache_queries_total``, ``_hits_total``) are
   read around every request: ``prefix_cache_hit_ratio`` is the proxy arm's hit rate from
   turn 6 on over the direct arm's (``e2e_hit_rate_direct``, ``e2e_hit_rate_leangate``);
   a turn whose counters moved by more than its own prompts (another client of the shared
   vLLM) is left out and counted (``e2e_contaminated_turns``).
   ``e2e_conversation_token_reduction``: vLLM's prompt tokens, direct over proxy, from
   turn 6 on; ``e2e_planted_fact_retention`` from the prompts the relay saw;
   ``e2e_fact_recall_answers_*``: recall turns whose answer holds the number. These come
   for all the conversations together and per part (``_tune``, ``_holdout``).

``--settings`` gives the stage's settings as JSON (the defaults otherwise). Without the
data files the result says which are missing and measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.localvllm import MODEL_NAME
from leangate.backend.tokenizer import Tokenizer
from leangate.backend.transport import HttpxTransport
from leangate.cache.embedder import Embedder
from leangate.cache.services import CacheServices
from leangate.cache.store import MemoryStore
from leangate.middleware.context import RequestContext
from leangate.middleware.endpoint import forward
from leangate.middleware.metrics import Metrics
from leangate.middleware.pipeline import build_chain
from leangate.middleware.services import Services
from leangate.retrieval.compress import HEADER, CompressSettings, CompressStage
from leangate.retrieval.summarize import (
    SUMMARY_INSTRUCTIONS,
    ExtractiveSettings,
    LlmSettings,
    SummaryRefused,
    extractive,
    llm_form,
)

from . import hotpot
from .common import (
    BenchError,
    add_common_arguments,
    backend_urls,
    free_port,
    header_fields,
    log,
    machine_info,
    rounded,
    spawn_proxy,
    tokenizer_env,
    tokens_counter,
)

MODEL = MODEL_NAME
MT_BENCH = Path("fastchat") / "mt_bench_question.jsonl"
TURNS = 10
LONG_TURNS = (1, 2, 4, 7)
MT_TURNS = {3: (0, 0), 5: (0, 1), 9: (1, 0)}
"""Turn: (which MT-bench question, which of its turns)."""
RECALL_TURNS = {6: 0, 8: 2, 10: 4}
"""Turn: which planted fact it asks back."""
FACT_TURNS = {1: (0, 1), 2: (2, 3), 4: (4, 5)}
FROM_TURN = 6
LONG_TURN_TOKENS = 900
MESSAGE_TOKENS = 5
SYSTEM = "You are a helpful assistant. Conversation {nonce}."
OFFLINE_REPLY = (
    "Thank you, I have read what you shared. Based on the notes, here is a short answer: the "
    "person you asked about is described in the second paragraph, and the dates given there "
    "are the ones to use for your question."
)
"""As long as an end-to-end answer (47 tokens; ``--max-tokens`` 48)."""

FIRST_NAMES = (
    "Orla", "Tamsin", "Bertil", "Ines", "Kofi", "Marisol", "Evander", "Sunniva",
    "Declan", "Yusra", "Caspian", "Linnea", "Osric", "Perpetua", "Ravi", "Zelda",
)  # fmt: skip
SURNAMES = (
    "Brennick", "Halloway", "Quennell", "Mastrovic", "Ashgrove", "Delacourt", "Fenwray",
    "Ostrander", "Pellham", "Vargalind", "Whitcombe", "Ysselstein", "Tarrow", "Maddox",
)  # fmt: skip
FACT_TEMPLATES = (
    "My colleague {name} will meet us at gate {number}.",
    "Please remember that the lab's access code is {number}; {name} set it up.",
    "For my records: {name} paid {number} euros for the tickets.",
    "I booked table {number} at the restaurant under the name {name}.",
    "Our project lead is {name}, and the budget we agreed on is {number} dollars.",
    "Note that {name} lives at number {number} on Elm Road.",
    "The parcel for {name} has tracking number {number}.",
    "Yesterday {name} told me the invoice total was {number} pounds.",
    "We need {number} chairs for the workshop {name} is running.",
    "By the way, I am {name} and my employee ID is {number}.",
    "The meeting room {name} reserved is room {number}.",
    "{name} scored {number} points in the final round of the quiz.",
    "The quote from {name} for the roof repair came to {number} pounds.",
    "My sister {name} is saving up {number} dollars for a bicycle.",
    "Keep in mind that {name}'s train leaves from platform {number}.",
    "The insurance claim {name} filed has reference {number}.",
)
"""Even positions are the tune part's, odd ones the held-out part's."""
INSTRUCTIONS = (
    "I'm pasting some notes from my reading. Please answer from them.",
    "Here are a few encyclopedia extracts I saved. Use them to answer my question.",
    "Below are some reference paragraphs. Answer briefly, using only them.",
    "Some background material follows; I'd like a short answer based on it.",
)
RECALL = (
    "What number did I mention in connection with {name}?",
    "Remind me: which number did I give you about {name}?",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--parts", default="offline,llm,e2e")
    parser.add_argument(
        "--conversations", type=int, default=None, help="per part (default 6, quick 3)"
    )
    parser.add_argument(
        "--e2e-conversations", type=int, default=None, help="per part (default 2, quick 1)"
    )
    parser.add_argument(
        "--settings",
        default="{}",
        help="the compress stage's settings, as JSON (the defaults otherwise)",
    )


def run(args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    count, tokenizer_dir = tokens_counter()
    settings = CompressSettings.model_validate(json.loads(args.settings))
    result: dict[str, object] = {"benchmark": "conversation", "quick": bool(args.quick)}
    result["tokens_counted_with"] = str(tokenizer_dir) if tokenizer_dir else "chars/4 estimate"
    result["settings"] = settings.model_dump(exclude_defaults=True)
    missing = [str(args.data_dir / p) for p in (hotpot.FILE, MT_BENCH)]
    missing = [p for p in missing if not Path(p).is_file()]
    if missing:
        result["missing_data"] = missing
        log(f"missing data, nothing measured: {missing}")
        return result
    per_part = args.conversations or (3 if args.quick else 6)
    conversations = build(args.data_dir, count, per_part, args.seed)
    e2e_count = args.e2e_conversations or (1 if args.quick else 2)
    chosen = _first_of_each_part(conversations, e2e_count)
    parts = set(args.parts.split(","))
    if "offline" in parts:
        result.update(asyncio.run(_offline(conversations, tokenizer_dir, settings)))
    if "llm" in parts or "e2e" in parts:
        with backend_urls(args) as urls:
            if "llm" in parts:
                result.update(asyncio.run(_llm(urls[0], chosen, count, settings)))
            if "e2e" in parts:
                result.update(_e2e(urls[0], chosen, args, settings, tokenizer_dir))
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_info()
    return result


# --- conversations --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fact:
    name: str
    number: str
    text: str

    def in_text(self, text: str) -> bool:
        return self.name in text and self.number in text


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    tune: bool
    turns: list[str]
    facts: list[Fact]
    recall: dict[int, Fact] = field(default_factory=dict)
    """Turn (from 1): the fact it asks back."""


def build(
    data_dir: Path, count: Callable[[str], int], per_part: int, seed: int
) -> list[Conversation]:
    """``per_part`` conversations of each part (see the module docstring)."""
    records = hotpot.load(data_dir)
    questions = _mt_bench(data_dir)
    out = []
    for tune in (True, False):
        part_records = [r for r in records if r.tune is tune]
        part_questions = [q for qid, q in questions if hotpot.is_tune(f"mt-{qid}") is tune]
        templates = FACT_TEMPLATES[0 if tune else 1 :: 2]
        for number in range(per_part):
            rng = random.Random(f"{seed}:{tune}:{number}")
            chosen = rng.sample(part_records, len(LONG_TURNS))
            asked = rng.sample(part_questions, 2)
            out.append(_conversation(chosen, asked, templates, count, rng, tune))
    return out


def _mt_bench(data_dir: Path) -> list[tuple[str, list[str]]]:
    rows = [json.loads(line) for line in (data_dir / MT_BENCH).read_text().splitlines() if line]
    return [(str(r["question_id"]), [str(t) for t in r["turns"]]) for r in rows]


def _conversation(
    records: list[hotpot.Record],
    questions: list[list[str]],
    templates: Sequence[str],
    count: Callable[[str], int],
    rng: random.Random,
    tune: bool,
) -> Conversation:
    facts = _facts(templates, rng)
    turns: list[str] = []
    for turn in range(1, TURNS + 1):
        if turn in LONG_TURNS:
            planted = [facts[i] for i in FACT_TURNS.get(turn, ())]
            record = records[LONG_TURNS.index(turn)]
            turns.append(_long_turn(record, planted, count, rng))
        elif turn in MT_TURNS:
            which, part = MT_TURNS[turn]
            turns.append(questions[which][min(part, len(questions[which]) - 1)])
        else:
            fact = facts[RECALL_TURNS[turn]]
            turns.append(rng.choice(RECALL).format(name=fact.name))
    ident = "+".join(r.id for r in records)
    recall = {turn: facts[i] for turn, i in RECALL_TURNS.items()}
    return Conversation(ident, tune, turns, facts, recall)


def _facts(templates: Sequence[str], rng: random.Random) -> list[Fact]:
    count = sum(len(v) for v in FACT_TURNS.values())
    firsts = rng.sample(FIRST_NAMES, count)
    lasts = rng.sample(SURNAMES, count)
    numbers: list[str] = []
    while len(numbers) < count:
        value = str(
            rng.choice(
                [rng.randint(210, 999), rng.randint(2100, 9999), rng.randint(10_000, 99_999)]
            )
        )
        if value not in numbers:
            numbers.append(value)
    chosen = rng.sample(list(templates), count)
    return [
        Fact(f"{f} {s}", n, t.format(name=f"{f} {s}", number=n))
        for f, s, n, t in zip(firsts, lasts, numbers, chosen, strict=True)
    ]


def _long_turn(
    record: hotpot.Record, facts: list[Fact], count: Callable[[str], int], rng: random.Random
) -> str:
    """An instruction, the record's paragraphs (gold ones first chosen) to about
    ``LONG_TURN_TOKENS``, the planted facts where ``rng`` puts them, and the question."""
    blocks = [
        f"## {title}\n" + " ".join(s.strip() for s in sents if s.strip())
        for title, sents in _paragraphs(record, count)
    ]
    instruction = rng.choice(INSTRUCTIONS)
    before_question: list[str] = []
    for fact in facts:
        place = rng.choice(("instruction", "between", "end"))
        if place == "instruction":
            instruction += " " + fact.text
        elif place == "between" and len(blocks) > 1:
            blocks.insert(rng.randint(1, len(blocks) - 1), fact.text)
        else:
            before_question.append(fact.text)
    pieces = [instruction, *blocks, *before_question, f"Question: {record.question}"]
    return "\n\n".join(pieces)


def _paragraphs(record: hotpot.Record, count: Callable[[str], int]) -> list[tuple[str, list[str]]]:
    supporting = set(record.supporting)
    gold = [i for i, (_, s) in enumerate(record.paragraphs) if supporting & {x.strip() for x in s}]
    order = gold + [i for i in range(len(record.paragraphs)) if i not in gold]
    chosen: list[int] = []
    used = 0
    for i in order:
        title, sents = record.paragraphs[i]
        tokens = count(title + " " + " ".join(sents))
        if used + tokens > LONG_TURN_TOKENS and chosen:
            continue
        chosen.append(i)
        used += tokens
    return [record.paragraphs[i] for i in sorted(chosen)]


def _first_of_each_part(conversations: list[Conversation], per_part: int) -> list[Conversation]:
    tune = [c for c in conversations if c.tune][:per_part]
    held = [c for c in conversations if not c.tune][:per_part]
    return [c for pair in zip(tune, held, strict=False) for c in pair] or tune + held


# --- what a prompt keeps ----------------------------------------------------------------------


@dataclass(slots=True)
class TurnRow:
    """One request of one arm."""

    conversation: str
    tune: bool
    turn: int
    before: int = 0
    after: int = 0
    facts_kept: int = 0
    facts: int = 0
    summaries_new: int = 0
    hits: float = 0.0
    queries: float = 0.0
    contaminated: bool = False
    seconds: float = 0.0
    recalled: bool | None = None
    header: dict[str, str] = field(default_factory=dict)


def facts_in_prompt(
    conversation: Conversation, turn: int, messages: Sequence[dict[str, Any]]
) -> tuple[int, int]:
    """Facts planted before ``turn`` that one earlier message of the prompt still states
    (its name and its number), of all of them."""
    planted = [conversation.facts[i] for t, idx in FACT_TURNS.items() if t < turn for i in idx]
    earlier = [str(m.get("content") or "") for m in messages[:-1]]
    kept = sum(any(f.in_text(text) for text in earlier) for f in planted)
    return kept, len(planted)


def prompt_tokens(messages: Sequence[dict[str, Any]], count: Callable[[str], int]) -> int:
    return sum(count(str(m.get("content") or "")) + MESSAGE_TOKENS for m in messages)


class Rewrites:
    """How the earlier long messages of one conversation were sent, request after request:
    how often one was sent otherwise than the request before sent it (from the request
    where it was the last message on: each such rewrite breaks vLLM's cached prefix
    there), and how many shortened forms each one took (1: summarized once)."""

    def __init__(self, min_tokens: int, count: Callable[[str], int]) -> None:
        self.min_tokens = min_tokens
        self.count = count
        self.sent: dict[int, str] = {}
        self.rewrites = 0
        self.forms: dict[int, set[str]] = {}

    def see(self, original: Sequence[dict[str, Any]], sent: Sequence[dict[str, Any]]) -> None:
        for index, (was, now) in enumerate(zip(original, sent, strict=True)):
            text, out = str(was.get("content") or ""), str(now.get("content") or "")
            if was.get("role") == "system" or self.count(text) < self.min_tokens:
                continue
            if index in self.sent and self.sent[index] != out:
                self.rewrites += 1
            self.sent[index] = out
            if out != text:
                self.forms.setdefault(index, set()).add(out)

    def figures(self, last: int) -> tuple[int, int, int, int]:
        """Rewrites, long messages seen, forms taken by messages that became earlier ones
        (not ``last``, the final request's own turn), and how many such messages."""
        forms = {i: f for i, f in self.forms.items() if i != last}
        return self.rewrites, len(self.sent), sum(len(f) for f in forms.values()), len(forms)


# --- offline ------------------------------------------------------------------------------------


async def _offline(
    conversations: list[Conversation], tokenizer_dir: Path | None, settings: CompressSettings
) -> dict[str, object]:
    """Every conversation through the stage in process (a scripted backend)."""
    sent: list[dict[str, Any]] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": MODEL, "max_model_len": 8192}]})
        sent.append(json.loads(request.content))
        reply = {"role": "assistant", "content": OFFLINE_REPLY}
        return httpx.Response(200, json={"choices": [{"index": 0, "message": reply}]})

    client = BackendClient(
        BackendSettings(urls=["http://scripted"]), HttpxTransport(httpx.MockTransport(answer))
    )
    await client.check_health()
    tokenizer = Tokenizer(client, {MODEL: tokenizer_dir} if tokenizer_dir else {})
    rows: list[TurnRow] = []
    rewrites: list[tuple[bool, int, int, int, int]] = []
    try:
        for conversation in conversations:
            seen = await _offline_one(conversation, client, tokenizer, settings, sent, rows)
            rewrites.append((conversation.tune, *seen.figures(2 * TURNS - 1)))
    finally:
        await client.aclose()
    return _offline_figures(rows, rewrites)


async def _offline_one(
    conversation: Conversation,
    client: BackendClient,
    tokenizer: Tokenizer,
    settings: CompressSettings,
    sent: list[dict[str, Any]],
    rows: list[TurnRow],
) -> Rewrites:
    """One conversation through a stage of its own (a fresh memory), turn by turn."""
    metrics = Metrics()
    cache = CacheServices(MemoryStore(), metrics)
    stage = CompressStage(
        "compress", settings, Services(client, metrics, cache, Embedder(), tokenizer)
    )
    chain = build_chain([(stage, 5.0)], forward, metrics)

    def count(text: str) -> int:
        return tokenizer.estimate(MODEL, text)

    seen = Rewrites(settings.min_turn_tokens, count)
    history: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM.format(nonce="offline")}]
    for turn, text in enumerate(conversation.turns, 1):
        messages = [*history, {"role": "user", "content": text}]
        ctx = _context(messages, client)
        await chain(ctx)
        out = sent[-1]["messages"]
        seen.see(messages, out)
        header = ctx.response_headers.get(HEADER, "")
        rows.append(_row(conversation, turn, messages, out, count, header))
        history += [messages[-1], {"role": "assistant", "content": OFFLINE_REPLY}]
    return seen


def _context(messages: list[dict[str, Any]], client: BackendClient) -> RequestContext:
    body = {"model": MODEL, "messages": messages, "max_tokens": 48, "temperature": 0}
    return RequestContext.validated("chat", body, tenant="bench", backend=client)


def _row(
    conversation: Conversation,
    turn: int,
    original: list[dict[str, Any]],
    sent: list[dict[str, Any]],
    count: Callable[[str], int],
    header: str,
) -> TurnRow:
    fields = header_fields(header)
    kept, total = facts_in_prompt(conversation, turn, sent)
    return TurnRow(
        conversation.id,
        conversation.tune,
        turn,
        before=prompt_tokens(original, count),
        after=prompt_tokens(sent, count),
        facts_kept=kept,
        facts=total,
        summaries_new=int(fields.get("summaries_new", 0)),
        header=fields,
    )


def _offline_figures(
    rows: list[TurnRow], rewrites: list[tuple[bool, int, int, int, int]]
) -> dict[str, object]:
    figures: dict[str, object] = {}
    for suffix, part in (("_tune", True), ("_holdout", False)):
        chosen = [r for r in rows if r.tune is part]
        late = [r for r in chosen if r.turn >= FROM_TURN]
        if not late:
            continue
        figures[f"conversation_token_reduction{suffix}"] = rounded(
            sum(r.before for r in late) / sum(r.after for r in late), 3
        )
        figures[f"conversation_token_reduction_min{suffix}"] = rounded(
            min(r.before / r.after for r in late), 3
        )
        figures[f"planted_fact_retention{suffix}"] = rounded(
            sum(r.facts_kept for r in late) / max(sum(r.facts for r in late), 1), 3
        )
        mine = [w for w in rewrites if w[0] is part]
        summarized = sum(w[4] for w in mine)
        figures[f"summary_calls_per_old_turn{suffix}"] = (
            rounded(sum(w[3] for w in mine) / summarized, 3) if summarized else None
        )
        figures[f"old_turn_rewrites_per_turn{suffix}"] = rounded(
            sum(w[1] for w in mine) / max(sum(w[2] for w in mine), 1), 3
        )
        figures[f"conversations{suffix}"] = len(mine)
        figures[f"turn_reduction_by_turn{suffix}"] = {
            str(t): rounded(
                sum(r.before for r in chosen if r.turn == t)
                / max(sum(r.after for r in chosen if r.turn == t), 1),
                2,
            )
            for t in range(1, TURNS + 1)
        }
    for key in (
        "conversation_token_reduction",
        "conversation_token_reduction_min",
        "planted_fact_retention",
        "summary_calls_per_old_turn",
        "old_turn_rewrites_per_turn",
    ):
        if f"{key}_holdout" in figures:
            figures[key] = figures[f"{key}_holdout"]
    log(f"offline: {figures}")
    return figures


# --- summaries by the model -------------------------------------------------------------------


async def _llm(
    url: str,
    conversations: list[Conversation],
    count: Callable[[str], int],
    settings: CompressSettings,
) -> dict[str, object]:
    """The long turns summarized by the backend model and extractively (the stage's code)."""
    llm = LlmSettings(
        settings.llm_chunk_tokens, settings.llm_summary_tokens, settings.summary_max_tokens
    )
    extract = ExtractiveSettings(
        settings.summary_ratio,
        settings.summary_max_tokens,
        settings.instruction_max_tokens,
        settings.fact_weight,
        settings.select,
    )
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=600) as http:

        async def complete(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
            answers = await asyncio.gather(
                *(_post(http, url, {"model": MODEL, **b}) for b in bodies)
            )
            return list(answers)

        for conversation in conversations:
            for turn in LONG_TURNS:
                text = conversation.turns[turn - 1]
                facts = [f for f in conversation.facts if f.text in text]
                started = time.perf_counter()
                refused = False
                try:
                    summary = await llm_form(
                        text, None, count, complete, llm, settings.instruction_max_tokens
                    )
                except SummaryRefused as exc:
                    refused, summary = True, ""
                    log(f"llm summary refused: {exc}")
                llm_s = time.perf_counter() - started
                started = time.perf_counter()
                extracted = extractive(text, None, count, extract)
                rows.append(
                    {
                        "tokens": count(text),
                        "llm_tokens": count(summary) if summary else count(text),
                        "extractive_tokens": count(extracted),
                        "llm_kept": sum(f.in_text(summary) for f in facts),
                        "extractive_kept": sum(f.in_text(extracted) for f in facts),
                        "facts": len(facts),
                        "refused": refused,
                        "llm_s": llm_s,
                        "extractive_s": time.perf_counter() - started,
                    }
                )
                log(f"llm summary {len(rows)}: {rows[-1]}; {summary[:160]!r}")
    return _llm_figures(rows)


async def _post(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(f"{url}/v1/chat/completions", json=body)
    if response.status_code != 200:
        raise BenchError(f"{url}: {response.status_code} {response.text[:300]}")
    answer: dict[str, Any] = response.json()
    return answer


def _llm_figures(rows: list[dict[str, Any]]) -> dict[str, object]:
    if not rows:
        return {}
    accepted = [r for r in rows if not r["refused"]]
    figures: dict[str, object] = {
        "llm_turns": len(rows),
        "llm_refused_share": rounded(1 - len(accepted) / len(rows), 3),
        "extractive_fact_retention": rounded(
            sum(r["extractive_kept"] for r in rows) / max(sum(r["facts"] for r in rows), 1), 3
        ),
        "extractive_token_reduction": rounded(
            sum(r["tokens"] for r in rows) / sum(r["extractive_tokens"] for r in rows), 3
        ),
        "extractive_ms_median": rounded(
            statistics.median(r["extractive_s"] for r in rows) * 1000, 1
        ),
        "llm_s_median": rounded(statistics.median(r["llm_s"] for r in rows), 2),
    }
    if accepted:
        figures["llm_fact_retention"] = rounded(
            sum(r["llm_kept"] for r in accepted) / max(sum(r["facts"] for r in accepted), 1), 3
        )
        figures["llm_token_reduction"] = rounded(
            sum(r["tokens"] for r in accepted) / sum(r["llm_tokens"] for r in accepted), 3
        )
    log(f"llm: {figures}")
    return figures


# --- end to end -----------------------------------------------------------------------------------


class Relay:
    """Between the proxy and vLLM: forwards every request (streams as they come) and keeps
    each chat request's body and its answer's usage, so the bench sees what the proxy sent."""

    def __init__(self, backend: str) -> None:
        self.backend = backend.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sent: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def taken(self) -> list[dict[str, Any]]:
        """The chat requests sent since the last call."""
        with self._lock:
            out, self.sent = self.sent, []
        return out

    def __enter__(self) -> Relay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        url = self.backend + request.path_qs
        async with self._session.request(
            request.method, url, data=body or None, headers=headers
        ) as up:
            kind = up.headers.get("content-type", "application/json")
            if "text/event-stream" in kind:
                out = web.StreamResponse(status=up.status, headers={"content-type": kind})
                await out.prepare(request)
                async for chunk in up.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
            data = await up.read()
        if request.path.endswith("/chat/completions") and body:
            self._keep(body, data)
        return web.Response(body=data, status=up.status, headers={"content-type": kind})

    def _keep(self, body: bytes, answer: bytes) -> None:
        try:
            usage = json.loads(answer).get("usage") or {}
        except (ValueError, AttributeError):
            usage = {}
        with self._lock:
            self.sent.append(
                {"body": json.loads(body), "prompt_tokens": int(usage.get("prompt_tokens") or 0)}
            )


def _counters(url: str) -> tuple[float, float]:
    """vLLM's prefix-cache counters: (queried tokens, hit tokens)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    totals = {"vllm:prefix_cache_queries_total": 0.0, "vllm:prefix_cache_hits_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:prefix_cache_queries_total"], totals["vllm:prefix_cache_hits_total"]


def _e2e(
    url: str,
    conversations: list[Conversation],
    args: argparse.Namespace,
    settings: CompressSettings,
    tokenizer_dir: Path | None,
) -> dict[str, object]:
    policy = {
        "rules": [
            {
                "name": "compress",
                "stages": [
                    {
                        "use": "compress",
                        "budget_ms": 5000,
                        "settings": settings.model_dump(exclude_defaults=True),
                    }
                ],
            }
        ]
    }
    tenant_key = f"bench-{uuid.uuid4().hex}"  # a tenant of its own: no form of an earlier run
    rows: dict[str, list[TurnRow]] = {"direct": [], "leangate": []}
    rewrites: list[tuple[bool, int, int, int, int]] = []
    count, _ = tokens_counter()
    with tempfile.TemporaryDirectory() as folder, Relay(url) as relay:
        path = Path(folder) / "conversation.yaml"
        path.write_text(json.dumps(policy))
        env = tokenizer_env(tokenizer_dir)
        with (
            spawn_proxy([relay.url], policy=path, env=env) as proxy,
            httpx.Client(timeout=900) as http,
        ):
            _wait_calibrated(http, proxy.url, tenant_key)
            for number, conversation in enumerate(conversations):
                arms = [("direct", url), ("leangate", proxy.url)]
                if number % 2:
                    arms.reverse()
                drive = _Drive(
                    http, relay, conversation, arms, args.max_tokens, tenant_key, count, settings
                )
                for turn in range(1, TURNS + 1):
                    drive.turn(turn)
                for name in rows:
                    rows[name] += drive.rows[name]
                rewrites.append((conversation.tune, *drive.rewrites.figures(2 * TURNS - 1)))
    return _e2e_figures(rows, rewrites)


class _Drive:
    """One conversation driven turn by turn through both arms."""

    def __init__(
        self,
        http: httpx.Client,
        relay: Relay,
        conversation: Conversation,
        arms: list[tuple[str, str]],
        max_tokens: int,
        tenant_key: str,
        count: Callable[[str], int],
        settings: CompressSettings,
    ) -> None:
        self.http, self.relay, self.conversation, self.arms = http, relay, conversation, arms
        self.max_tokens, self.tenant_key, self.count = max_tokens, tenant_key, count
        self.systems = {name: SYSTEM.format(nonce=uuid.uuid4().hex[:12]) for name, _ in arms}
        self.transcript: list[dict[str, Any]] = []
        self.rows: dict[str, list[TurnRow]] = {name: [] for name, _ in arms}
        self.rewrites = Rewrites(settings.min_turn_tokens, count)

    def turn(self, turn: int) -> None:
        user = {"role": "user", "content": self.conversation.turns[turn - 1]}
        answers: dict[str, str] = {}
        for name, url in self.arms:
            messages = [{"role": "system", "content": self.systems[name]}, *self.transcript, user]
            answers[name] = self._ask(name, url, turn, messages)
        self.transcript += [user, {"role": "assistant", "content": answers["direct"]}]

    def _ask(self, name: str, url: str, turn: int, messages: list[dict[str, Any]]) -> str:
        body = {
            "model": MODEL,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        headers = {"authorization": f"Bearer {self.tenant_key}"}
        self.relay.taken()
        queried, hit = _counters(url if name == "direct" else self.relay.backend)
        started = time.perf_counter()
        response = self.http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise BenchError(f"{name} turn {turn}: {response.status_code} {response.text[:300]}")
        queried2, hit2 = _counters(url if name == "direct" else self.relay.backend)
        answer = response.json()
        text = str(answer["choices"][0]["message"].get("content") or "")
        tokens = int(answer["usage"]["prompt_tokens"])
        row = TurnRow(self.conversation.id, self.conversation.tune, turn, seconds=seconds)
        row.hits, row.queries, row.after = hit2 - hit, queried2 - queried, tokens
        expected = tokens
        if name == "leangate":
            taken = self.relay.taken()
            expected = sum(t["prompt_tokens"] for t in taken)
            main = [t["body"] for t in taken if not _is_summary(t["body"])]
            if main:
                sent = main[-1]["messages"]
                row.facts_kept, row.facts = facts_in_prompt(self.conversation, turn, sent)
                self.rewrites.see(messages, sent)
            row.header = header_fields(response.headers.get(HEADER, ""))
            row.summaries_new = sum(_is_summary(t["body"]) for t in taken)
        row.contaminated = abs(row.queries - expected) > 0
        fact = self.conversation.recall.get(turn)
        row.recalled = None if fact is None else fact.number in text
        self.rows[name].append(row)
        log(
            f"{self.conversation.id[:17]} turn {turn} {name}: {tokens} tokens, hits {row.hits:.0f}/"
            f"{row.queries:.0f}{' (other traffic)' if row.contaminated else ''}, {seconds:.2f}s "
            f"{response.headers.get(HEADER, '')}"
        )
        return text


def _is_summary(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    first = str(messages[0].get("content") or "") if messages else ""
    return first.startswith(SUMMARY_INSTRUCTIONS[:40])


def _wait_calibrated(http: httpx.Client, url: str, tenant_key: str) -> None:
    """Wait for the proxy's backend profile (calibrated in the background at start-up), so
    that the cost check runs on measured speeds."""
    sample = " ".join(
        f"Line {i} of a calibration note about harbours and boats." for i in range(160)
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        body = {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": f"{uuid.uuid4().hex}\n\n{sample}\n\nWhich line is first?",
                }
            ],
            "max_tokens": 1,
        }
        response = http.post(
            f"{url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {tenant_key}w"},
        )
        if response.status_code == 200 and "uncalibrated" not in response.headers.get(HEADER, ""):
            return
        time.sleep(2)
    raise BenchError("the proxy's backend profile did not calibrate within 300 s")


Pair = tuple[TurnRow, TurnRow]
"""One turn: the direct arm's request and the proxy arm's."""


def _e2e_figures(
    rows: dict[str, list[TurnRow]], rewrites: list[tuple[bool, int, int, int, int]]
) -> dict[str, object]:
    pairs = list(zip(rows["direct"], rows["leangate"], strict=True))
    late = [(d, g) for d, g in pairs if d.turn >= FROM_TURN]
    clean = [(d, g) for d, g in late if not d.contaminated and not g.contaminated]
    figures: dict[str, object] = {
        "e2e_conversations": len({d.conversation for d, _ in pairs}),
        "e2e_contaminated_turns": len(late) - len(clean),
    }
    for suffix, part in (("", None), ("_tune", True), ("_holdout", False)):
        mine = [(d, g) for d, g in late if part is None or d.tune is part]
        figures.update(_prompt_figures(mine, suffix))
        figures.update(_hit_figures([p for p in mine if p in clean], suffix))
    if late:
        figures["e2e_latency_ratio_median"] = rounded(
            statistics.median(d.seconds / g.seconds for d, g in late), 3
        )
    for name, arm in rows.items():
        asked = [r for r in arm if r.recalled is not None]
        if asked:
            figures[f"e2e_fact_recall_answers_{name}"] = rounded(
                sum(bool(r.recalled) for r in asked) / len(asked), 3
            )
    figures["e2e_llm_summary_calls"] = sum(g.summaries_new for _, g in pairs)
    summarized = sum(w[4] for w in rewrites)
    figures["e2e_summary_calls_per_old_turn"] = (
        rounded(sum(w[3] for w in rewrites) / summarized, 3) if summarized else None
    )
    figures["e2e_old_turn_rewrites_per_turn"] = rounded(
        sum(w[1] for w in rewrites) / max(sum(w[2] for w in rewrites), 1), 3
    )
    figures["e2e_hit_rate_by_turn"] = {
        str(t): [_rate([r for r in rows[arm] if r.turn == t]) for arm in ("direct", "leangate")]
        for t in range(1, TURNS + 1)
    }
    log(f"end to end: {figures}")
    return figures


def _rate(rows: Sequence[TurnRow]) -> float:
    """vLLM's prefix-cache hit rate over ``rows``: hit tokens over queried tokens."""
    return rounded(sum(r.hits for r in rows) / max(sum(r.queries for r in rows), 1), 3)


def _hit_figures(pairs: list[Pair], suffix: str) -> dict[str, object]:
    if not pairs:
        return {}
    direct, proxy = _rate([d for d, _ in pairs]), _rate([g for _, g in pairs])
    return {
        f"e2e_hit_rate_direct{suffix}": direct,
        f"e2e_hit_rate_leangate{suffix}": proxy,
        f"prefix_cache_hit_ratio{suffix}": rounded(proxy / direct, 3) if direct else None,
    }


def _prompt_figures(pairs: list[Pair], suffix: str) -> dict[str, object]:
    """vLLM's prompt tokens, direct over proxy, and the planted facts the proxy sent."""
    if not pairs:
        return {}
    return {
        f"e2e_conversation_token_reduction{suffix}": rounded(
            sum(d.after for d, _ in pairs) / sum(g.after for _, g in pairs), 3
        ),
        f"e2e_conversation_token_reduction_min{suffix}": rounded(
            min(d.after / g.after for d, g in pairs), 3
        ),
        f"e2e_planted_fact_retention{suffix}": rounded(
            sum(g.facts_kept for _, g in pairs) / max(sum(g.facts for _, g in pairs), 1), 3
        ),
    }
