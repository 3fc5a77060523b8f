"""Context for a question, from chunks: choose its sentences within a token budget, then
write the chosen ones as one context block.

The chunks come from documents attached to the request and from named corpora
(``retrieval/rag.py`` gathers them). Selection is ``retrieval/select.py``'s, sentence by
sentence, each paragraph a section; a chunk found by a corpus search brings its search score
along as a prior. Chosen sentences stay in their order; paragraphs are written strongest
last by default, right before the question: small models use best what is nearest the
question and the prompt's start ("Lost in the Middle", Liu et al., 2023).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .chunks import Chunk
from .select import Candidate, Selector, SelectSettings
from .text import Segment, SegmentKind

SEPARATOR_TOKENS = 2
"""The line breaks around a chunk's head, charged with the head."""
Order = Literal["strongest-last", "strongest-first", "original"]


@dataclass(frozen=True, slots=True)
class Piece:
    """A chunk offered to selection, and where it came from."""

    chunk: Chunk
    source: str
    """``request`` for attached documents and marked blocks, else the corpus's name."""
    prior: float | None = None
    """The corpus search's fused score (None for attached documents)."""


@dataclass(frozen=True, slots=True)
class Evidence:
    text: str
    """The context block (empty when nothing was chosen)."""
    cited: list[Piece]
    """The chunks at least one chosen sentence came from, as written."""
    tokens: int
    """Tokens of ``text``."""


class Pool:
    """The sentences of some chunks as selection candidates. A paragraph is a section
    (its first sentence usually says what it is about), even when it is cut into several
    chunks."""

    def __init__(
        self, pieces: Sequence[Piece], count: Callable[[str], int], *, with_ids: bool = False
    ) -> None:
        self.pieces = list(pieces)
        self.count = count
        self.with_ids = with_ids
        self.candidates: list[Candidate] = []
        self.owner: list[int] = []
        """Each candidate's piece."""
        sections: dict[tuple[str, str, int], int] = {}
        for number, piece in enumerate(self.pieces):
            chunk = piece.chunk
            key = (piece.source, chunk.doc_id, chunk.paragraph)
            section = sections.setdefault(key, len(sections))
            # the head is a heading candidate: selection charges it with the chunk's first
            # chosen sentence, so the budget covers the context as written
            segments = [_segment(_head([chunk], with_ids), "heading", 0)]
            segments += [_segment(text, "sentence", n) for n, text in enumerate(chunk.sentences)]
            for seg in segments:
                tokens = count(seg.text) + (SEPARATOR_TOKENS if seg is segments[0] else 0)
                self.candidates.append(Candidate(seg, section, chunk.title, tokens))
                self.owner.append(number)
        self.tokens = sum(c.tokens for c in self.candidates)
        """Tokens of the whole context, as written."""

    def tokens_from(self, source: str) -> int:
        return sum(
            c.tokens
            for i, c in enumerate(self.candidates)
            if self.pieces[self.owner[i]].source == source
        )

    def selector(self, question: str, settings: SelectSettings) -> Selector:
        selector = Selector(question, self.candidates, settings)
        priors = [
            (i, piece.prior)
            for i, c in enumerate(self.candidates)
            if (piece := self.pieces[self.owner[i]]).prior is not None and selector.scorable[i]
        ]
        if priors:
            selector.add_dense([i for i, _ in priors], [p for _, p in priors])
        return selector

    def scorable(self) -> list[int]:
        """The candidates selection scores (sentences outside protected spans)."""
        return [
            i
            for i, c in enumerate(self.candidates)
            if c.segment.kind == "sentence" and not c.segment.hard
        ]

    def everything(self) -> set[int]:
        return set(range(len(self.candidates)))


def write(pool: Pool, keep: set[int], scores: np.ndarray, order: Order) -> Evidence:
    """The chosen sentences as a context block: one entry per paragraph with a chosen
    sentence (a paragraph cut into several chunks is written once), under its head."""
    by_section: dict[int, list[int]] = {}
    for i in sorted(keep):
        if pool.candidates[i].segment.kind != "heading":
            by_section.setdefault(pool.candidates[i].section, []).append(i)
    sections = list(by_section)
    if order != "original":
        strength = {s: max(float(scores[i]) for i in by_section[s]) for s in sections}
        sections.sort(key=lambda s: strength[s], reverse=order == "strongest-first")
    entries = []
    cited: list[int] = []
    for section in sections:
        members = by_section[section]
        owners = list(dict.fromkeys(pool.owner[i] for i in members))
        cited += owners
        head = _head([pool.pieces[o].chunk for o in owners], pool.with_ids)
        entries.append(f"{head}\n" + " ".join(pool.candidates[i].text for i in members))
    text = "\n\n".join(entries)
    return Evidence(text, [pool.pieces[o] for o in cited], pool.count(text) if text else 0)


def _segment(text: str, kind: SegmentKind, index: int) -> Segment:
    """A chunk's sentence (or head) as a selection candidate's segment. Selection needs
    no offsets here: the context is written from the candidates' texts."""
    return Segment(0, 0, kind, 0, index, False, text)


def _head(chunks: Sequence[Chunk], with_ids: bool) -> str:
    """What names a paragraph's chunks in the prompt: their title (it says what "it" and
    "she" are), their ids when there is no title or when the model should cite ids."""
    title = chunks[0].title
    if with_ids or not title:
        ids = ", ".join(c.id for c in chunks)
        return f"[{ids}]" + (f" {title}" if title else "")
    return f"## {title}"
