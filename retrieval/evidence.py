"""Context for a question, from chunks: choose its sentences within a token budget, then
write the chosen ones as one context block.

The chunks come from documents attached to the request and from named corpora
(``retrieval/rag.py`` gathers them). Selection is ``retrieval/select.py``'s, sentence by
sentence, each paragraph a section; a chunk found by a corpus search brings its search score
along as a prior. Chosen sentences stay in their chunk's order; chunks are written
strongest last by default, right before the question: small models use best what is
nearest the question and the prompt's start ("Lost in the Middle", Liu et al., 2023).
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
            segments = [_segment(_head(chunk, with_ids), "heading", 0)]
            segments += [_segment(text, "sentence", n) for n, text in enumerate(chunk.sentences)]
            for seg in segments:
                tokens = count(seg.text) + (SEPARATOR_TOKENS if seg is segments[0] else 0)
                self.candidates.append(Candidate(seg, section, chunk.title, tokens))
                self.owner.append(number)

    @property
    def tokens(self) -> int:
        """Tokens of the whole context, as written."""
        return sum(c.tokens for c in self.candidates)

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
    """The chosen sentences as a context block: one entry per chunk with a chosen
    sentence, under its head (its title, or its id)."""
    chosen: dict[int, list[int]] = {}
    heads: dict[int, str] = {}
    for i in sorted(keep):
        candidate = pool.candidates[i]
        if candidate.segment.kind == "heading":
            heads[pool.owner[i]] = candidate.text
        else:
            chosen.setdefault(pool.owner[i], []).append(i)
    pieces = list(chosen)
    if order != "original":
        strength = {p: max(float(scores[i]) for i in chosen[p]) for p in pieces}
        pieces.sort(key=lambda p: strength[p], reverse=order == "strongest-first")
    entries = []
    for p in pieces:
        head = heads.get(p) or _head(pool.pieces[p].chunk, False)
        entries.append(f"{head}\n" + " ".join(pool.candidates[i].text for i in chosen[p]))
    text = "\n\n".join(entries)
    return Evidence(text, [pool.pieces[p] for p in pieces], pool.count(text) if text else 0)


def _segment(text: str, kind: SegmentKind, index: int) -> Segment:
    """A chunk's sentence (or head) as a selection candidate's segment. Selection needs
    no offsets here: the context is written from the candidates' texts."""
    return Segment(0, 0, kind, 0, index, False, text)


def _head(chunk: Chunk, with_id: bool) -> str:
    """What names a chunk in the prompt: its title (it says what "it" and "she" are), its
    id when it has none or when the model should cite ids."""
    if with_id or not chunk.title:
        return f"[{chunk.id}]" + (f" {chunk.title}" if chunk.title else "")
    return f"## {chunk.title}"
