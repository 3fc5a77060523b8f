"""The ``compress`` stage on conversations, against a scripted backend: earlier turns sent
byte for byte as the request before sent them, each summarized once, ``keep_messages``,
model summaries that fail or do not pay, and input it leaves alone."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import httpx
import pytest
from compress_corpus import INSTRUCTION, document, more_sections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from recording_backend import RecordingBackend, services_of

from leangate.backend.client import BackendClient
from leangate.backend.profile import Estimate
from leangate.bench.common import header_fields
from leangate.middleware.context import RequestContext
from leangate.middleware.endpoint import forward
from leangate.middleware.pipeline import build_chain
from leangate.middleware.protocol import RequestOptions
from leangate.retrieval import compress, summarize
from leangate.retrieval.compress import HEADER, CompressSettings, CompressStage
from leangate.retrieval.summarize import SUMMARY_INSTRUCTIONS

SECTIONS = more_sections(80)
FACTS = [
    "My colleague Wren Pallister will meet us at gate 4471.",
    "Please note the locker number 815 that Ivo Strand rented.",
    "I paid 2316 crowns for the ferry tickets.",
    "Our guide Sela Marrick starts at 9 sharp.",
]
BASE: dict[str, Any] = {
    "mode": "always",
    "min_prompt_tokens": 50,
    "min_turn_tokens": 60,
    "min_block_tokens": 40,
}
Messages = list[dict[str, Any]]


class ScriptedBackend(RecordingBackend):
    """Answers "ok"; a model-summary request gets ``summary`` (None: an error), after
    ``delay_s``."""

    def __init__(self, summary: str | None = "The works made rope.", delay_s: float = 0) -> None:
        super().__init__(max_model_len=100_000)
        self.summary = summary
        self.delay_s = delay_s
        self.summary_calls = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            body = json.loads(request.content)
            if str(body["messages"][0]["content"]).startswith(SUMMARY_INSTRUCTIONS[:30]):
                self.summary_calls += 1
                await asyncio.sleep(self.delay_s)
                if self.summary is None:
                    return httpx.Response(500, json={"error": {"message": "broken"}})
                reply = {"message": {"role": "assistant", "content": self.summary}}
                return httpx.Response(200, json={"choices": [reply]})
        return await super().handle(request)

    @property
    def prompts(self) -> list[Messages]:
        """The chat requests' messages, model summaries left out."""
        return [
            b["messages"]
            for b in self.bodies
            if not str(b["messages"][0]["content"]).startswith(SUMMARY_INSTRUCTIONS[:30])
        ]


def _turn(number: int) -> str:
    """A long user turn: an instruction, ten sections of its own, a fact, a question."""
    sections = SECTIONS[number * 10 : number * 10 + 10]
    fact = FACTS[number % len(FACTS)]
    return (
        f"{INSTRUCTION}\n\n{document(sections)}\n\n{fact}\n\n"
        f"Question: What did {sections[1][0]} make?"
    )


def _reply(number: int) -> str:
    """A long answer."""
    return document(SECTIONS[60 + number * 2 : 62 + number * 2])


def _history(turns: int) -> Messages:
    history: Messages = [{"role": "system", "content": "You are terse."}]
    for number in range(turns):
        history += [
            {"role": "user", "content": _turn(number)},
            {"role": "assistant", "content": _reply(number)},
        ]
    return history


def _request(turn: int) -> Messages:
    return [*_history(turn), {"role": "user", "content": _turn(turn)}]


class Conversation:
    """A stage in a chain in front of a scripted backend; one request at a time."""

    def __init__(self, backend: ScriptedBackend, client: BackendClient, stage: CompressStage):
        self.backend, self.client, self.stage = backend, client, stage
        self.chain = build_chain([(stage, 5.0)], forward, stage.services.metrics)

    @classmethod
    async def open(cls, backend: ScriptedBackend | None = None, **settings: Any) -> Conversation:
        backend = backend or ScriptedBackend()
        client = await backend.client()
        stage = CompressStage(
            "compress", CompressSettings(**{**BASE, **settings}), services_of(client)
        )
        return cls(backend, client, stage)

    async def ask(self, messages: Messages, tenant: str = "t", **options: Any) -> dict[str, str]:
        """Send ``messages``; the stage's header as fields."""
        body = {"model": "m", "messages": messages, "max_tokens": 8}
        ctx = RequestContext.validated(
            "chat", body, tenant=tenant, backend=self.client, options=RequestOptions(**options)
        )
        await self.chain(ctx)
        return header_fields(ctx.response_headers.get(HEADER, ""))

    async def turns(self, count: int) -> list[dict[str, str]]:
        return [await self.ask(_request(turn)) for turn in range(count)]


def _new(fields: dict[str, str]) -> int:
    return int(fields.get("summaries_new", 0))


async def test_each_request_starts_with_the_request_before_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each earlier turn is summarized once (the extractive summarizer runs once per old
    answer) and every later request sends it again as it was: the prompt only grows."""
    summarized: list[str] = []
    real = summarize.extractive

    def counted(text: str, *args: Any) -> str:
        summarized.append(text)
        return real(text, *args)

    monkeypatch.setattr(compress, "extractive", counted)
    chat = await Conversation.open(keep_recent_turns=0)
    fields = await chat.turns(6)
    sent = chat.backend.prompts
    for before, after in itertools.pairwise(sent):
        assert after[: len(before)] == before
    assert sorted(summarized) == sorted(_reply(n) for n in range(5))
    assert [_new(f) for f in fields] == [0, 1, 1, 1, 1, 1]
    assert [int(f.get("summaries_reused", 0)) for f in fields] == [0, 1, 3, 5, 7, 9]
    last, asked = sent[-1], _request(5)
    assert last[0] == asked[0], "the system prompt is never altered"
    assert [m["role"] for m in last] == [m["role"] for m in asked]
    shorter = [len(s["content"]) < len(a["content"]) for s, a in zip(last, asked, strict=True)]
    assert shorter == [False] + [True] * (len(asked) - 1)
    everything = "\n".join(m["content"] for m in last)
    assert all(fact in everything for fact in FACTS), "the user's facts are still there"
    assert all(f"Question: What did {SECTIONS[10 * n + 1][0]}" in everything for n in range(6))


async def test_the_previous_answer_stays_whole_until_it_is_older() -> None:
    chat = await Conversation.open()  # keep_recent_turns: 1
    fields = await chat.turns(3)
    sent = chat.backend.prompts
    assert sent[1][2]["content"] == _reply(0), "a follow-up sees the whole answer"
    assert sent[2][4]["content"] == _reply(1)
    assert len(sent[2][2]["content"]) < len(_reply(0)), "one turn later, its summary"
    assert [_new(f) for f in fields] == [0, 0, 1]


async def test_forms_are_remembered_per_tenant() -> None:
    chat = await Conversation.open(keep_recent_turns=0)
    await chat.turns(3)
    before = chat.backend.prompts[-1]
    again = Conversation(
        chat.backend, chat.client, CompressStage("other", chat.stage.settings, chat.stage.services)
    )
    fields = await again.ask(_request(3))
    assert (_new(fields), int(fields["summaries_reused"])) == (1, 5)
    assert chat.backend.prompts[-1][: len(before)] == before
    elsewhere = await again.ask(_request(3), tenant="u")
    assert (_new(elsewhere), elsewhere.get("summaries_reused")) == (6, "0")


async def test_remembered_forms_are_sent_even_when_compressing_would_not_pay() -> None:
    chat = await Conversation.open(mode="auto", keep_recent_turns=0)
    profile = chat.stage.services.profile
    profile.calibrated = True
    profile.estimate = Estimate(0.05, 200.0, 0.04, 0.005, 0.0)  # slow prefill: it pays
    await chat.turns(2)
    before = chat.backend.prompts[-1]
    profile.estimate = Estimate(0.05, 1e9, 0.04, 0.005, 0.0)  # instant prefill
    fields = await chat.ask(_request(2))
    assert fields["decision"] == "compressed" and fields["reason"] == "no-gain+known"
    sent = chat.backend.prompts[-1]
    assert sent[: len(before)] == before
    assert sent[-2:] == _request(2)[-2:], "the new turns go as they are"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_kept_messages_pass_byte_identical(data: st.DataObject) -> None:
    pool = [_turn(n) for n in range(3)] + [_reply(n) for n in range(3)]
    pool += ["Short and sweet.", "Ünïcødé — “quotes” 🚀 " * 40 + "?", "   "]
    turns = data.draw(st.integers(1, 5))
    messages: Messages = [{"role": "system", "content": data.draw(st.sampled_from(pool))}]
    for _ in range(turns):
        messages.append({"role": "user", "content": data.draw(st.sampled_from(pool))})
        messages.append({"role": "assistant", "content": data.draw(st.sampled_from(pool))})
    messages.append({"role": "user", "content": data.draw(st.sampled_from(pool[:3]))})
    keep = sorted(data.draw(st.sets(st.integers(0, len(messages) + 2))))
    recent = data.draw(st.integers(0, 2))

    async def run() -> Messages:
        chat = await Conversation.open(keep_recent_turns=recent)
        await chat.ask(messages, keep_messages=keep)
        return chat.backend.prompts[-1]

    sent = asyncio.run(run())
    assert len(sent) == len(messages)
    assert [m["role"] for m in sent] == [m["role"] for m in messages]
    assert sent[0] == messages[0]
    for index in keep:
        if index < len(messages):
            assert sent[index] == messages[index]


def test_keep_messages_is_a_list_of_indexes() -> None:
    assert RequestOptions(keep_messages=[0, 3]).keep_messages == [0, 3]
    for bad in ([-1], ["1"], [1.5], 3):
        with pytest.raises(ValidationError):
            RequestOptions(keep_messages=bad)
    inputs = RequestOptions(keep_messages=[3, 0, 3]).answer_inputs()
    assert inputs is not None and inputs["keep_messages"] == [0, 3], "the cache key knows it"
    assert RequestOptions().answer_inputs() is None


async def _fallback_case(
    backend: ScriptedBackend, **settings: Any
) -> tuple[Messages, dict[str, str]]:
    chat = await Conversation.open(
        backend, summarizer="llm", keep_recent_turns=0, llm_chunk_tokens=4000, **settings
    )
    fields = await chat.ask(_request(2))
    return chat.backend.prompts[-1], fields


async def _extractive_case() -> Messages:
    chat = await Conversation.open(keep_recent_turns=0)
    await chat.ask(_request(2))
    return chat.backend.prompts[-1]


@pytest.mark.parametrize(
    ("summary", "delay_s", "timeout_s"),
    [(None, 0.0, 60.0), ("It was founded in 1111.", 0.0, 60.0), ("Fine.", 0.5, 0.05)],
    ids=["backend-error", "number-not-in-text", "timeout"],
)
async def test_a_failed_model_summary_falls_back_to_extractive(
    summary: str | None, delay_s: float, timeout_s: float
) -> None:
    backend = ScriptedBackend(summary, delay_s)
    sent, fields = await _fallback_case(backend, llm_timeout_s=timeout_s)
    assert backend.summary_calls == 4, "each old turn's one piece was asked for"
    assert fields["summaries_fallback"] == "4" and fields["summaries_llm"] == "0"
    assert sent == await _extractive_case()


async def test_the_model_summarizes_only_when_it_pays() -> None:
    slow_decode = Estimate(0.05, 5000.0, 0.5, 0.0, 0.0)
    chat = await Conversation.open(mode="auto", summarizer="llm", keep_recent_turns=0)
    profile = chat.stage.services.profile
    profile.calibrated, profile.estimate = True, slow_decode
    fields = await chat.ask(_request(2))
    assert chat.backend.summary_calls == 0, "4 old turns at 50 s each would not pay"
    assert fields["decision"] == "compressed" and _new(fields) == 4
    profile.estimate = Estimate(0.05, 20.0, 0.001, 0.0, 0.0)  # slow prefill, fast decode
    fields = await chat.ask(_request(2), tenant="u")
    # the long user turns pay for their model summary; the shorter answers do not
    assert chat.backend.summary_calls == 2
    assert (fields["summaries_llm"], fields["summaries_new"]) == ("2", "4")


async def test_a_conversation_is_left_alone_when_compressing_would_not_pay() -> None:
    chat = await Conversation.open(mode="auto", summarizer="llm")
    profile = chat.stage.services.profile
    profile.calibrated = True
    profile.estimate = Estimate(0.05, 1e9, 0.04, 0.005, 0.0)  # instant prefill
    fields = await chat.ask(_request(3))
    assert fields["decision"] == "skipped" and fields["reason"] == "no-gain"
    assert chat.backend.summary_calls == 0
    assert chat.backend.prompts[-1] == _request(3)


@pytest.mark.parametrize(
    "messages",
    [
        [
            {"role": "user", "content": [{"type": "text", "text": _turn(0)}]},
            {"role": "assistant", "content": _reply(0)},
            {"role": "user", "content": _turn(1)},
        ],
        [
            {"role": "user", "content": _turn(0)},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "1"},
            {"role": "user", "content": _turn(1)},
        ],
    ],
    ids=["content-parts", "tool-calls"],
)
async def test_conversations_it_cannot_read_pass_through_untouched(messages: Messages) -> None:
    chat = await Conversation.open()
    fields = await chat.ask(messages)
    assert fields == {"decision": ""}
    assert chat.backend.bodies[-1]["messages"] == messages


async def test_without_summaries_earlier_turns_are_cut_for_each_question() -> None:
    chat = await Conversation.open(summarize=False)
    fields = await chat.ask(_request(2))
    sent = chat.backend.prompts[-1]
    assert "summaries_new" not in fields and "summary" not in fields["method"]
    assert len(sent[1]["content"]) < len(_turn(0)), "a long earlier user turn is cut"
    assert sent[2]["content"] == _reply(0), "answers are not"
