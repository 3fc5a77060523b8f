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
from .text import segment

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
    """Tokens of the chosen sentences."""


class Pool:
    """The sentences of some chunks as selection candidates. A paragraph is a section
    (its first sentence usually says what it is about), even when it is cut into several
    chunks."""

    def __init__(self, pieces: Sequence[Piece], count: Callable[[str], int]) -> None:
        self.pieces = list(pieces)
        self.candidates: list[Candidate] = []
        self.owner: list[int] = []
        """Each candidate's piece."""
        sections: dict[tuple[str, str, int], int] = {}
        for number, piece in enumerate(self.pieces):
            chunk = piece.chunk
            key = (piece.source, chunk.doc_id, chunk.paragraph)
            section = sections.setdefault(key, len(sections))
            for seg in segment(chunk.text):
                self.candidates.append(Candidate(seg, section, chunk.title, count(seg.text)))
                self.owner.append(number)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.candidates)

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
    """The chosen sentences as a context block: one entry per chunk, headed by its id and
    title."""
    chosen: dict[int, list[int]] = {}
    for i in sorted(keep):
        chosen.setdefault(pool.owner[i], []).append(i)
    sections = list(chosen)
    if order != "original":
        strength = {s: max(float(scores[i]) for i in chosen[s]) for s in sections}
        sections.sort(key=lambda s: strength[s], reverse=order == "strongest-first")
    entries = []
    for s in sections:
        piece = pool.pieces[s]
        head = f"[{piece.chunk.id}]" + (f" {piece.chunk.title}" if piece.chunk.title else "")
        body = " ".join(pool.candidates[i].text for i in chosen[s])
        entries.append(f"{head}\n{body}")
    tokens = sum(pool.candidates[i].tokens for i in keep)
    return Evidence("\n\n".join(entries), [pool.pieces[s] for s in sections], tokens)
