"""Which parts of a chat may be compressed, and the compressed chat.

Never altered: system messages, assistant and tool messages, short user messages, and in
the last user message its first paragraph when it is short (the instruction) and its last
paragraph (the question). Long earlier user messages and the middle of the last one (the
documents pasted between instruction and question) are compressible, sentence by sentence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .select import Candidate, Selection, Selector, SelectSettings, candidates_of
from .text import Segment, assemble, segment

Count = Callable[[str], int]


@dataclass(frozen=True, slots=True)
class Part:
    """One message's text, cut into segments; ``locked`` ones are always kept."""

    message: int
    text: str
    segments: list[Segment]
    locked: frozenset[int]


@dataclass
class Plan:
    question: str
    parts: list[Part]
    candidates: list[Candidate]
    owners: list[tuple[int, int]]
    """For each candidate: its part and its segment's index there."""

    @property
    def compressible_tokens(self) -> int:
        return sum(c.tokens for c in self.candidates)


def plan(
    messages: Sequence[Mapping[str, Any]],
    count: Count,
    *,
    min_block_tokens: int,
    instruction_max_tokens: int,
    exclude: Collection[int] = (),
    earlier_turns: bool = True,
) -> Plan | None:
    """The compressible parts of ``messages``, or None when the chat has no plain-text
    last user turn (tool calls, images) or nothing to compress.

    ``exclude``: messages sent exactly as given (the caller's ``keep_messages``).
    ``earlier_turns``: long earlier user turns are parts too (off when the stage
    summarizes earlier turns instead)."""
    if not messages or any(not isinstance(m.get("content"), str | None) for m in messages):
        return None
    last = messages[-1]
    if last.get("role") != "user" or not str(last.get("content") or "").strip():
        return None
    parts: list[Part] = []
    question = ""
    for index, message in enumerate(messages):
        text = str(message.get("content") or "")
        if index in exclude:
            continue
        if index == len(messages) - 1:
            part, question = _last_turn(index, text, count, instruction_max_tokens)
            parts.append(part)
        elif earlier_turns and message.get("role") == "user" and count(text) >= min_block_tokens:
            parts.append(Part(index, text, segment(text), frozenset()))
    if len(messages) - 1 in exclude:  # the question still guides the other parts
        question = question_of(str(last.get("content") or ""))
    return _plan_of(question, parts, count)


def lone_plan(
    text: str,
    count: Count,
    *,
    question: str | None,
    instruction_max_tokens: int,
) -> Plan | None:
    """One message's text as a plan of its own, for its summary. With ``question`` None
    (a user's message) its first short paragraph and its last one are locked, as in a last
    turn, and the last one is the question; otherwise (an assistant's answer) nothing is
    locked and ``question`` is what it answered."""
    if question is None:
        part, own = _last_turn(0, text, count, instruction_max_tokens)
        return _plan_of(own, [part], count)
    return _plan_of(question, [Part(0, text, segment(text), frozenset())], count)


def _plan_of(question: str, parts: list[Part], count: Count) -> Plan | None:
    candidates: list[Candidate] = []
    owners: list[tuple[int, int]] = []
    for number, part in enumerate(parts):
        found = candidates_of(part.segments, count, section_base=_next_section(candidates))
        for i, candidate in enumerate(found):
            if i not in part.locked:
                candidates.append(candidate)
                owners.append((number, i))
    if not candidates:
        return None
    return Plan(question, parts, candidates, owners)


def question_of(text: str) -> str:
    """A user message's question: its last paragraph, without headings (what an answer
    to it answers)."""
    segments = segment(text)
    if not segments:
        return ""
    last = segments[-1].paragraph
    return " ".join(s.text for s in segments if s.paragraph == last and s.kind != "heading")


def _next_section(candidates: Sequence[Candidate]) -> int:
    return candidates[-1].section + 1 if candidates else 0


def _last_turn(
    index: int, text: str, count: Count, instruction_max_tokens: int
) -> tuple[Part, str]:
    segments = segment(text)
    paragraphs = sorted({s.paragraph for s in segments})
    locked_paragraphs = set(paragraphs[-1:])
    if paragraphs:
        first = " ".join(s.text for s in segments if s.paragraph == paragraphs[0])
        if count(first) <= instruction_max_tokens:
            locked_paragraphs.add(paragraphs[0])
    locked = frozenset(i for i, s in enumerate(segments) if s.paragraph in locked_paragraphs)
    question_text = (
        " ".join(s.text for s in segments if s.paragraph == paragraphs[-1] and s.kind != "heading")
        if paragraphs
        else ""
    )
    return Part(index, text, segments, locked), question_text


def select(plan_: Plan, budget: int, settings: SelectSettings) -> Selection:
    """Lexical selection with the second hop (no dense scores)."""
    selector = Selector(plan_.question, plan_.candidates, settings)
    if settings.hop_sources:
        selector.second_hop()
    return selector.choose(budget)


def rebuild(
    messages: Sequence[Mapping[str, Any]],
    plan_: Plan,
    keep: set[int],
    earlier: Mapping[int, set[int]] | None = None,
) -> list[dict[str, Any]]:
    """``messages`` with each compressible part reduced to its locked and kept segments.

    ``earlier`` maps a part to the segments an earlier request kept of the same text:
    those are kept in place, so the part reads exactly as it did then and vLLM's prefix
    cache still holds it, and the segments ``keep`` adds follow them (before the part's
    question paragraph, if it has one)."""
    earlier = earlier or {}
    kept = segments_by_part(plan_, keep)
    out = [dict(m) for m in messages]
    for number, part in enumerate(plan_.parts):
        base = earlier.get(number)
        if base is None:
            text = assemble(part.text, part.segments, part.locked | kept[number])
        else:
            text = _after_earlier(part, base, kept[number] - base)
        out[part.message]["content"] = text
    return out


def segments_by_part(plan_: Plan, keep: set[int]) -> dict[int, set[int]]:
    """The chosen candidates as segment indexes of each part."""
    kept: dict[int, set[int]] = {n: set() for n in range(len(plan_.parts))}
    for candidate in keep:
        number, index = plan_.owners[candidate]
        kept[number].add(index)
    return kept


def part_key(plan_: Plan, number: int) -> str:
    """What identifies a part's compressible text across requests (not its question)."""
    texts = [
        c.text for c, (n, _) in zip(plan_.candidates, plan_.owners, strict=True) if n == number
    ]
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def _after_earlier(part: Part, base: set[int], extra: set[int]) -> str:
    if not extra:
        return assemble(part.text, part.segments, part.locked | base)
    last = part.segments[-1].paragraph
    tail = {i for i in part.locked if part.segments[i].paragraph == last}
    pieces = [
        assemble(part.text, part.segments, (part.locked | base) - tail).rstrip(),
        assemble(part.text, part.segments, extra).strip(),
    ]
    if tail:
        pieces.append(assemble(part.text, part.segments, tail).strip())
    return "\n\n".join(p for p in pieces if p)


def budget(plan_: Plan, before: int, *, ratio: float, target_tokens: int | None = None) -> int:
    """Tokens the compressible candidates may keep so that the whole prompt of ``before``
    tokens shrinks to ``target_tokens`` (or by ``ratio``)."""
    target = target_tokens if target_tokens is not None else round(before / ratio)
    return max(target - (before - plan_.compressible_tokens), 0)
