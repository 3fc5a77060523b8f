"""Prompts full of protected spans, built in code, and a check that compression kept them.

Every prompt is an instruction, invented notes (with code blocks, JSON, links, URLs,
speaker turns, numbers, quotes and ``<keep>`` spans mixed in), and a question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from leangate.retrieval.select import candidates_of
from leangate.retrieval.spans import protected_spans
from leangate.retrieval.text import Segment, segment

SUBJECTS = ("The pump", "The north valve", "Our kiln", "The relay board", "A spare drone")
VERBS = ("runs", "stays idle", "cools down", "draws power", "logs errors", "waits")
PLACES = ("in the annex", "near the loading dock", "after the night shift", "on Mondays")


@dataclass(frozen=True, slots=True)
class Case:
    text: str
    instruction: str
    question: str
    hard: tuple[str, ...]


def _filler(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}."


def _protected(rng: random.Random, k: int) -> tuple[str, str | None]:
    """A sentence or block with a protected span, and the span when it must always stay."""
    kind = rng.randrange(9)
    if kind == 0:
        block = f"```python\ndef scale_{k}(value):\n    return value * {k}.5\n```"
        return block, block
    if kind == 1:
        block = f"    retries = {k}\n    timeout_s = {k * 3}"
        return block, block
    if kind == 2:
        value = f'{{"id": {k}, "name": "unit-{k}", "tags": ["spare", "tested"]}}'
        return f"The record reads {value} in the log.", value
    if kind == 3:
        link = f"[the wiring guide](https://example.org/guides/{k}.html)"
        return f"See {link} before opening the panel.", link
    if kind == 4:
        url = f"https://status.example.net/boards?id={k}"
        return f"Live readings are at {url} for the crew.", url
    if kind == 5:
        return f"User: Is bay {k} free?\nAssistant: Bay {k} is free until noon.", None
    if kind == 6:
        return f"The gauge showed {k}.25 bar at 07:{k % 60:02d} on 2024-03-{k % 28 + 1:02d}.", None
    if kind == 7:
        return f'The label on crate {k} says "Handle with care. Fragile."', None
    keep = f"<keep>Always quote order {4000 + k} exactly.</keep>"
    return f"{keep} {_filler(rng)}", keep


def protected_prompts(seed: int, count: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for n in range(count):
        instruction = "Use the notes below to answer. Keep numbers and names exactly."
        question = f"Question: What does the pump do in the annex on day {n}?"
        paragraphs: list[str] = []
        hard: list[str] = []
        for p in range(rng.randint(6, 14)):
            sentences = [_filler(rng) for _ in range(rng.randint(2, 6))]
            text = " ".join(sentences)
            if rng.random() < 0.7:
                piece, span = _protected(rng, n * 100 + p)
                text = f"{text}\n\n{piece}" if "\n" in piece else f"{text} {piece}"
                if span:
                    hard.append(span)
            paragraphs.append(text)
        body = "\n\n".join(paragraphs)
        cases.append(
            Case(f"{instruction}\n\n{body}\n\n{question}", instruction, question, tuple(hard))
        )
    return cases


def violations(case: Case, out: str) -> list[str]:
    """What compression altered that it must not have."""
    problems = []
    if not out.startswith(case.instruction):
        problems.append("instruction altered")
    if not out.endswith(case.question):
        problems.append("question altered")
    problems += [f"hard span lost: {span!r}" for span in case.hard if span not in out]
    segments = segment(case.text)
    spans = protected_spans(case.text)
    for seg in segments:
        inside = [s for s in spans if seg.start <= s.start and s.end <= seg.end]
        if not inside or seg.text in out:
            continue
        for span in inside:
            piece = case.text[span.start : span.end]
            if span.kind != "label" and case.text.count(piece) == 1 and piece in out:
                problems.append(f"sentence cut around {piece!r}")
    problems += _labels_lost(segments, out)
    return problems


def _labels_lost(segments: list[Segment], out: str) -> list[str]:
    """A speaker's sentence kept without its label."""
    problems = []
    candidates = candidates_of(segments)
    for c in candidates:
        if c.segment.kind != "sentence" or not c.title or c.segment.text not in out:
            continue
        heading = next(
            h.segment.text
            for h in candidates
            if h.section == c.section and h.segment.kind == "heading"
        )
        if heading.endswith(":") and heading not in out:
            problems.append(f"label {heading!r} lost")
    return problems
