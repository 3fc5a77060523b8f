"""``leangate bench conversation``: summarized conversations against whole ones.

Data: 10-turn conversations. Turns 1, 2, 4 and 7 paste a document (a HotpotQA
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

The code: this module has the entry points (``add_arguments``, ``run``) and parts 1 and 2;
``bench/conversation_data.py`` builds the conversations and reads what a prompt keeps of
them; ``bench/conversation_e2e.py`` is part 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from leangate.backend.client import BackendClient, BackendSettings
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
    header_fields,
    log,
    machine_info,
    rounded,
    tokens_counter,
)
from .conversation_data import (
    FROM_TURN,
    LONG_TURNS,
    MODEL,
    MT_BENCH,
    SYSTEM,
    TURNS,
    Conversation,
    Rewrites,
    TurnRow,
    build,
    facts_in_prompt,
    first_of_each_part,
    prompt_tokens,
)
from .conversation_e2e import e2e

# ``build`` and ``facts_in_prompt`` live in ``conversation_data.py``; exported here too.
__all__ = ["add_arguments", "build", "facts_in_prompt", "run"]

OFFLINE_REPLY = (
    "Thank you, I have read what you shared. Based on the notes, here is a short answer: the "
    "person you asked about is described in the second paragraph, and the dates given there "
    "are the ones to use for your question."
)
"""As long as an end-to-end answer (47 tokens; ``--max-tokens`` 48)."""


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
    chosen = first_of_each_part(conversations, e2e_count)
    parts = set(args.parts.split(","))
    if "offline" in parts:
        result.update(asyncio.run(_offline(conversations, tokenizer_dir, settings)))
    if "llm" in parts or "e2e" in parts:
        with backend_urls(args) as urls:
            if "llm" in parts:
                result.update(asyncio.run(_llm(urls[0], chosen, count, settings)))
            if "e2e" in parts:
                result.update(e2e(urls[0], chosen, args, settings, tokenizer_dir))
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_info()
    return result


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
