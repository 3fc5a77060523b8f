"""The conversations of ``leangate bench conversation``, and what a prompt keeps of them.

How they are built and split is told in ``bench/conversation.py``'s docstring. Here: the
constants they are built from (some, such as ``MODEL``, ``TURNS`` and ``SYSTEM``, also used
by the parts that send them), ``build`` and its helpers, and what a prompt keeps:
``TurnRow`` (one request of one arm), ``facts_in_prompt``, ``prompt_tokens`` and
``Rewrites``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leangate.backend.localvllm import MODEL_NAME

from . import hotpot

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
    """``per_part`` conversations of each part (see ``bench/conversation.py``'s docstring)."""
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


def first_of_each_part(conversations: list[Conversation], per_part: int) -> list[Conversation]:
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
