"""Cutting a text into the units compression keeps or drops, and putting kept ones back.

``segment`` partitions a text into *segments*: sentences, headings (markdown headings,
title lines, speaker labels on a line of their own) and blocks (code and multi-line JSON).
No segment boundary falls inside a protected span (``retrieval/spans.py``), so a kept
segment carries its spans byte for byte. ``assemble`` joins the kept segments with the
original whitespace between them, so that a text whose segments are all kept comes back
unchanged.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from .spans import Span, protected_spans

SegmentKind = Literal["sentence", "heading", "block"]

_ABBREVIATION_TEXT = (
    "mr mrs ms dr prof sr jr st mt vs etc inc ltd co corp no fig eq approx dept est "
    "gen col lt sgt capt rev gov sen rep jan feb mar apr jun jul aug sep sept oct nov dec "
    "e.g i.e al u.s u.k a.m p.m ph.d"
)
ABBREVIATIONS = frozenset(_ABBREVIATION_TEXT.split())
SENTENCE_END = re.compile(
    r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+(?:<keep>|[\"'\u201c\u2018(\[]?[A-Z0-9]))"
)
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n\s*")
BLANK_LINE = re.compile(r"\n[ \t\r]*\n")
HEADING_LINE = re.compile(r"#{1,6}[ \t]+\S[^\n]*")
LIST_ITEM = re.compile(r"[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+")
TITLE_MAX_WORDS = 12
CLAUSE_END = (".", "!", "?", ":", ";")


@dataclass(frozen=True, slots=True)
class Segment:
    start: int
    end: int
    """``text[start:end]``, without surrounding whitespace."""
    kind: SegmentKind
    paragraph: int
    index: int
    """Position within its paragraph."""
    hard: bool
    """Holds a hard protected span: always kept."""
    text: str


def segment(text: str, spans: Sequence[Span] | None = None) -> list[Segment]:
    """The segments of ``text``, in order; see the module docstring."""
    spans = protected_spans(text) if spans is None else spans
    guard = _Guard(spans)
    pieces: list[tuple[int, int, SegmentKind]] = []
    for start, end, is_block in _regions(text, spans):
        if is_block:
            pieces.append((start, end, "block"))
        else:
            pieces.extend(_prose(text, start, end, guard))
    return _number(text, pieces, guard)


def assemble(text: str, segments: Sequence[Segment], keep: Collection[int]) -> str:
    """``text`` with only the segments whose indexes are in ``keep``. Between two kept
    segments goes the gap with the most line breaks among those the dropped ones left
    (a paragraph break survives the paragraph's last sentence)."""
    if not segments:
        return text
    kept = sorted(i for i in keep if 0 <= i < len(segments))
    if len(kept) == len(segments):
        return text
    if not kept:
        return ""
    out = [text[: segments[kept[0]].start] if kept[0] == 0 else ""]
    for previous, current in itertools.pairwise(kept):
        out.append(segments[previous].text)
        gaps = [text[segments[i].end : segments[i + 1].start] for i in range(previous, current)]
        out.append(max(gaps, key=lambda g: g.count("\n")))
    last = kept[-1]
    out.append(segments[last].text)
    if last == len(segments) - 1:
        out.append(text[segments[last].end :])
    return "".join(out)


# --- regions and paragraphs ---------------------------------------------------------------


def _regions(text: str, spans: Sequence[Span]) -> list[tuple[int, int, bool]]:
    """Prose regions and the code or JSON blocks that stand on lines of their own."""
    regions: list[tuple[int, int, bool]] = []
    position = 0
    for span in spans:
        if span.kind not in ("code", "json", "keep") or not _own_lines(text, span):
            continue
        if span.start > position:
            regions.append((position, span.start, False))
        regions.append((span.start, span.end, True))
        position = span.end
    if position < len(text):
        regions.append((position, len(text), False))
    return regions


def _own_lines(text: str, span: Span) -> bool:
    before = text[: span.start].rsplit("\n", 1)[-1]
    after = text[span.end :].split("\n", 1)[0]
    return not before.strip() and not after.strip() and "\n" in text[span.start : span.end]


class _Guard:
    """Answers "is this position inside a protected span?" in O(log n)."""

    def __init__(self, spans: Sequence[Span]) -> None:
        self.spans = list(spans)
        self.starts = [s.start for s in self.spans]

    def covering(self, position: int) -> Span | None:
        i = bisect.bisect_right(self.starts, position) - 1
        if i >= 0 and self.spans[i].start < position < self.spans[i].end:
            return self.spans[i]
        return None

    def any_hard(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self.starts, start)
        if i > 0 and self.spans[i - 1].end > start:
            i -= 1
        for span in self.spans[i:]:
            if span.start >= end:
                return False
            if span.hard and span.end > start:
                return True
        return False

    def label_at(self, start: int) -> Span | None:
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.spans) and self.spans[i].start == start and self.spans[i].kind == "label":
            return self.spans[i]
        return None


def _prose(text: str, start: int, end: int, guard: _Guard) -> list[tuple[int, int, SegmentKind]]:
    pieces: list[tuple[int, int, SegmentKind]] = []
    position = start
    for m in PARAGRAPH_BREAK.finditer(text, start, end):
        if guard.covering(m.start()) is None:
            pieces.extend(_paragraph(text, position, m.start(), guard))
            position = m.end()
    pieces.extend(_paragraph(text, position, end, guard))
    return pieces


def _paragraph(
    text: str, start: int, end: int, guard: _Guard
) -> list[tuple[int, int, SegmentKind]]:
    """A paragraph's headings and sentences. A line is a unit of its own when it is a
    heading, starts with a speaker label (the label becomes a heading) or a list marker,
    or follows a line that ends a clause; otherwise a line break is a space in a wrapped
    sentence."""
    pieces: list[tuple[int, int, SegmentKind]] = []
    run: int | None = None
    run_end = start

    def flush() -> None:
        nonlocal run
        if run is not None:
            pieces.extend(_sentences(text, run, run_end, guard))
            run = None

    lines = _lines(text, start, end)
    for number, (line_start, line_end) in enumerate(lines):
        free = guard.covering(line_start) is None
        label = guard.label_at(line_start) if free else None
        following = text[lines[number + 1][0]] if number + 1 < len(lines) else ""
        if free and label is None and _is_heading(text[line_start:line_end], number, following):
            flush()
            pieces.append((line_start, line_end, "heading"))
            continue
        if label is not None:
            flush()
            pieces.append((line_start, label.end, "heading"))
            line_start = _skip_space(text, label.end, line_end)
            if line_start >= line_end:
                continue
            run = line_start
        elif free and (run is None or LIST_ITEM.match(text, line_start)):
            flush()
            run = line_start
        elif run is None:
            run = line_start
        run_end = line_end
        if text[line_start:line_end].endswith(CLAUSE_END) and guard.covering(line_end) is None:
            flush()
    flush()
    return pieces


def _skip_space(text: str, position: int, end: int) -> int:
    while position < end and text[position].isspace():
        position += 1
    return position


def _lines(text: str, start: int, end: int) -> list[tuple[int, int]]:
    lines = []
    position = start
    while position < end:
        newline = text.find("\n", position, end)
        stop = end if newline < 0 else newline
        first, last = position, stop
        while first < last and text[first] in " \t\r":
            first += 1
        while last > first and text[last - 1] in " \t\r":
            last -= 1
        if first < last:
            lines.append((first, last))
        position = stop + 1
    return lines


def _is_heading(line: str, number: int, following: str) -> bool:
    """A markdown heading, or a title line: the first of a paragraph, short, without
    punctuation at its end, and followed by a line that does not continue its sentence."""
    if HEADING_LINE.fullmatch(line):
        return True
    return (
        number == 0
        and bool(following)
        and not following.islower()
        and len(line.split()) <= TITLE_MAX_WORDS
        and not line.endswith((".", "!", "?", ",", ";", ":"))
        and LIST_ITEM.match(line) is None
    )


def _is_label_line(text: str, start: int, end: int, guard: _Guard) -> bool:
    label = guard.label_at(start)
    return label is not None and not text[label.end : end].strip()


# --- sentences ----------------------------------------------------------------------------


def _sentences(
    text: str, start: int, end: int, guard: _Guard
) -> list[tuple[int, int, SegmentKind]]:
    pieces: list[tuple[int, int, SegmentKind]] = []
    position = start
    for m in SENTENCE_END.finditer(text, start, end):
        cut = m.end()
        if guard.covering(cut) is not None:
            continue
        if m.group().startswith(".") and _abbreviation(text, m.start()):
            continue
        pieces.append((position, cut, "sentence"))
        position = _skip_space(text, cut, end)
    if position < end:
        pieces.append((position, end, "sentence"))
    return pieces


def _abbreviation(text: str, dot: int) -> bool:
    word = re.search(r"[\w.]+$", text[max(0, dot - 12) : dot])
    if word is None:
        return False
    token = word.group().lower()
    return token in ABBREVIATIONS or len(token) == 1 or bool(re.fullmatch(r"(?:\w\.)+\w", token))


def _number(text: str, pieces: list[tuple[int, int, SegmentKind]], guard: _Guard) -> list[Segment]:
    segments: list[Segment] = []
    paragraph = -1
    index = 0
    previous_end = 0
    for start, end, kind in pieces:
        if start >= end:
            continue
        gap = text[previous_end:start]
        if not segments or BLANK_LINE.search(gap):
            paragraph, index = paragraph + 1, 0
        segments.append(
            Segment(
                start,
                end,
                kind,
                paragraph,
                index,
                kind == "block" or guard.any_hard(start, end),
                text[start:end],
            )
        )
        index += 1
        previous_end = end
    return segments
