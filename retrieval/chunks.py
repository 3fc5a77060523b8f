"""Documents cut into chunks: runs of whole sentences inside one paragraph.

A chunk never crosses a paragraph break and never splits a sentence (``retrieval/text.py``
finds both), so a chunk reads as written. Each keeps its document's id, its position among
the document's chunks (neighbours are ``position ± 1``) and the heading above it, which
names what its pronouns refer to.

    chunks = chunk_document("guide", text)
    chunks[0].id  # "guide#0": what a citation names
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .text import Segment, segment

DEFAULT_CHUNK_TOKENS = 160


@dataclass(frozen=True, slots=True)
class Chunk:
    doc_id: str
    position: int
    """Index among its document's chunks."""
    title: str
    """The heading above it ('' when none); the document's title metadata otherwise."""
    text: str
    start: int
    end: int
    """``document[start:end]`` is the chunk's text."""
    sentences: tuple[str, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    paragraph: int = 0
    """The document's paragraph the chunk is in (a long paragraph makes several chunks)."""

    @property
    def id(self) -> str:
        return chunk_id(self.doc_id, self.position)


def chunk_id(doc_id: str, position: int) -> str:
    return f"{doc_id}#{position}"


def chunk_document(
    doc_id: str,
    text: str,
    *,
    metadata: Mapping[str, Any] | None = None,
    max_tokens: int = DEFAULT_CHUNK_TOKENS,
    count: Callable[[str], int] | None = None,
    segments: Sequence[Segment] | None = None,
) -> list[Chunk]:
    """``text`` cut into chunks of whole sentences of at most ``max_tokens`` (a longer
    sentence is a chunk of its own). ``count`` defaults to a rough 4 characters a token;
    ``segments`` are ``segment(text)``'s, when the caller has them already."""
    metadata = dict(metadata or {})
    measure = count or _rough_tokens
    default_title = str(metadata.get("title", ""))
    chunks: list[Chunk] = []
    run: list[Segment] = []
    run_tokens = 0
    title = default_title

    def flush() -> None:
        nonlocal run, run_tokens
        if run:
            chunks.append(_chunk(doc_id, len(chunks), title, text, run, metadata))
        run, run_tokens = [], 0

    for seg in segment(text) if segments is None else segments:
        if seg.kind == "heading":
            flush()
            title = seg.text.lstrip("#").strip().rstrip(":").strip() or default_title
            continue
        tokens = measure(seg.text)
        if run and (seg.paragraph != run[-1].paragraph or run_tokens + tokens > max_tokens):
            flush()
        run.append(seg)
        run_tokens += tokens
    flush()
    return chunks


def _chunk(
    doc_id: str,
    position: int,
    title: str,
    text: str,
    run: list[Segment],
    metadata: Mapping[str, Any],
) -> Chunk:
    start, end = run[0].start, run[-1].end
    return Chunk(
        doc_id=doc_id,
        position=position,
        title=title,
        text=text[start:end],
        start=start,
        end=end,
        sentences=tuple(s.text for s in run),
        metadata=metadata,
        paragraph=run[0].paragraph,
    )


def _rough_tokens(text: str) -> int:
    return max(1, round(len(text) / 4))
