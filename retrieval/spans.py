"""Protected spans: pieces of a prompt that compression must never alter.

*Hard* spans (code blocks, JSON, URLs, markdown links, caller-marked ``<keep>…</keep>``)
are always kept, with the sentence that holds them. *Soft* spans (numbers, quoted strings,
inline code, role and speaker labels) may be dropped, but only together with their whole
sentence: a kept sentence is never cut, so what it says about a number or a quote stays
exactly as written.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Literal

import orjson

Kind = Literal["keep", "code", "json", "link", "url", "inline_code", "label", "quote", "number"]
HARD_KINDS: frozenset[str] = frozenset({"keep", "code", "json", "link", "url"})
MAX_JSON_CHARS = 20_000


@dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int
    kind: Kind

    @property
    def hard(self) -> bool:
        return self.kind in HARD_KINDS


KEEP = re.compile(r"<keep>.*?</keep>", re.S)
FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.S | re.M)
INDENTED = re.compile(r"(?:(?<=\n\n)|\A)(?:(?: {4}|\t)[^\n]*(?:\n|\Z))+")
LINK = re.compile(r"!?\[[^\]\n]{0,300}\]\([^)\s]{1,2000}(?:\s+\"[^\"\n]*\")?\)")
URL = re.compile(r"\b(?:https?|ftp)://[^\s<>\"')\]]+|\bwww\.[^\s<>\"')\]]+")
INLINE_CODE = re.compile(r"`[^`\n]+`")
LABEL = re.compile(
    r"^[ \t]*(?:[A-Z][\w'.-]{0,20}(?:[ \t][A-Z][\w'.-]{0,20}){0,2}|[QA])[ \t]*:(?=\s)", re.M
)
QUOTE = re.compile(r"\"[^\"\n]{1,300}\"|“[^”\n]{1,300}”|«[^»\n]{1,300}»")
NUMBER = re.compile(r"[$€£]?\d+(?:[.,:/-]\d+)*(?:%|st|nd|rd|th)?")
URL_TRAILING = ".,;:!?"
STRUCTURE = re.compile(r'[{}\[\]"\\\n]')


def protected_spans(text: str) -> list[Span]:
    """Every protected span of ``text``, sorted and not overlapping: where two overlap,
    the one found first in the order hard-then-soft wins (a number inside a JSON object
    belongs to the object)."""
    finders: tuple[tuple[Kind, list[tuple[int, int]]], ...] = (
        ("keep", _matches(KEEP, text)),
        ("code", _code_blocks(text)),
        ("json", _json_values(text)),
        ("link", _matches(LINK, text)),
        ("url", _urls(text)),
        ("inline_code", _matches(INLINE_CODE, text)),
        ("label", _labels(text)),
        ("quote", _matches(QUOTE, text)),
        ("number", _matches(NUMBER, text)),
    )
    starts: list[int] = []
    taken: list[Span] = []
    for kind, spans in finders:
        for start, end in spans:
            i = bisect.bisect_left(starts, start)
            if (i > 0 and taken[i - 1].end > start) or (i < len(taken) and taken[i].start < end):
                continue
            starts.insert(i, start)
            taken.insert(i, Span(start, end, kind))
    return taken


def _matches(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)]


def _code_blocks(text: str) -> list[tuple[int, int]]:
    found = _matches(FENCE, text)
    for m in INDENTED.finditer(text):
        end = m.end() - (1 if m.group().endswith("\n") else 0)
        if not any(s < end and m.start() < e for s, e in found):
            found.append((m.start(), end))
    return found


def _labels(text: str) -> list[tuple[int, int]]:
    return [
        (m.start() + len(m.group()) - len(m.group().lstrip()), m.end())
        for m in LABEL.finditer(text)
    ]


def _urls(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in URL.finditer(text):
        end = m.end()
        while end > m.start() and text[end - 1] in URL_TRAILING:
            end -= 1
        spans.append((m.start(), end))
    return spans


def _json_values(text: str) -> list[tuple[int, int]]:
    """JSON objects, and arrays that hold strings or objects (``[1]``, a citation marker,
    is left to the number rule): balanced brackets that parse."""
    spans: list[tuple[int, int]] = []
    position = 0
    for start, end in sorted(_bracket_pairs(text).items()):
        if start >= position and end - start <= MAX_JSON_CHARS and _is_json(text[start:end]):
            spans.append((start, end))
            position = end
    return spans


def _bracket_pairs(text: str) -> dict[int, int]:
    """Each opening bracket's matching end, in one pass over the bracket, quote, backslash
    and newline characters only (strings respected; a JSON string holds no raw newline, and
    a mismatched closer abandons the brackets still open)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    in_string = False
    escaped_at = -1
    for m in STRUCTURE.finditer(text):
        i, char = m.start(), m.group()
        if in_string:
            if i == escaped_at:
                continue
            if char == "\\":
                escaped_at = i + 1
            elif char == '"':
                in_string = False
            elif char == "\n":
                in_string = False
                stack.clear()
        elif char == '"':
            in_string = bool(stack)
        elif char in "{[":
            stack.append(i)
        elif char in "}]" and stack:
            start = stack.pop()
            if (text[start] == "{") == (char == "}"):
                pairs[start] = i + 1
            else:
                stack.clear()
    return pairs


def _is_json(candidate: str) -> bool:
    if candidate.startswith("[") and not any(c in candidate for c in '"{'):
        return False
    try:
        orjson.loads(candidate)
    except orjson.JSONDecodeError:
        return False
    return True
