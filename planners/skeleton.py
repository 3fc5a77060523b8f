"""Skeleton-of-Thought's two kinds of prompts, and the outline as parsed data.

The outline is generated under a regular expression (vLLM structured outputs), so even a
135M model returns a numbered list of short points. It is still model output: parsing
bounds the number and length of points, drops empty and duplicate ones, and keeps only
plain text, so nothing in an outline can act as an instruction to the proxy. In an
expansion prompt a point is quoted as the topic of one paragraph, nothing more.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

MAX_POINTS = 8
MIN_POINTS = 4
POINT_CHARS = 28

SKELETON_SYSTEM = (
    "You plan answers before writing them. Reply with a numbered outline of the answer "
    "to the user's question: {min_points} to {max_points} points, each a short phrase of "
    "a few words. Write no explanations."
)
EXPAND_SYSTEM = (
    "You write one part of a longer answer: one short paragraph of two or three "
    "sentences about the given point only."
)


def skeleton_regex(min_points: int = MIN_POINTS, max_points: int = MAX_POINTS) -> str:
    """A numbered list of ``min_points`` to ``max_points`` short lines."""
    line = r"[A-Za-z][A-Za-z ,'&/-]{2,LIMIT}\n".replace("LIMIT", str(POINT_CHARS - 1))
    required = "".join(rf"{i}\. {line}" for i in range(1, min_points + 1))
    optional = "".join(rf"({i}\. {line})?" for i in range(min_points + 1, max_points + 1))
    return required + optional


@dataclass(frozen=True)
class Outline:
    points: tuple[str, ...]

    def numbered(self) -> str:
        return "\n".join(f"{i}. {point}" for i, point in enumerate(self.points, 1))


_ITEM = re.compile(r"^\s*(\d{1,2})[.)]\s+(.+?)\s*$")
_UNSAFE = re.compile(r"[^\w\s,;:'&()/+%.-]", re.UNICODE)


class PointReader:
    """Reads an outline line by line as it is generated: each new, distinct point is
    returned as soon as its line is complete, so its expansion can start at once."""

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        self.max_points = max_points
        self.points: list[str] = []
        self._seen: set[str] = set()
        self._pending = ""

    @property
    def full(self) -> bool:
        return len(self.points) >= self.max_points

    def feed(self, text: str) -> list[str]:
        """New points completed by ``text``."""
        *lines, self._pending = (self._pending + text).split("\n")
        return [point for line in lines if (point := self._take(line)) is not None]

    def close(self) -> list[str]:
        """Points on a last line without a newline."""
        line, self._pending = self._pending, ""
        point = self._take(line)
        return [] if point is None else [point]

    def _take(self, line: str) -> str | None:
        match = _ITEM.match(line)
        if match is None or self.full:
            return None
        point = _clean(match.group(2))
        key = point.lower().rstrip(".")
        if not point or key in self._seen:
            return None
        self._seen.add(key)
        self.points.append(point)
        return point


def parse_outline(text: str, max_points: int = MAX_POINTS) -> Outline | None:
    """The points of a numbered outline; None if it has fewer than ``MIN_POINTS``."""
    reader = PointReader(max_points)
    reader.feed(text)
    reader.close()
    return Outline(tuple(reader.points)) if len(reader.points) >= MIN_POINTS else None


def _clean(point: str) -> str:
    """Plain words only, bounded: a point is a title, not a place for markup or commands."""
    return _whole_words(" ".join(_UNSAFE.sub(" ", point).split()), complete=True)


_MARKS = " .,;:-'&/"


def _whole_words(title: str, *, complete: bool) -> str:
    """``title`` without a word the length bound cut (the outline's pattern stops a line
    at ``POINT_CHARS``), or, while the line is still being written, its last word."""
    if not complete or len(title) >= POINT_CHARS:
        title = title[:POINT_CHARS]
        if " " in title:
            title = title[: title.rfind(" ")]
        elif not complete:
            title = ""
    return title.strip(_MARKS)


def skeleton_messages(question: str) -> list[dict[str, str]]:
    system = SKELETON_SYSTEM.format(min_points=MIN_POINTS, max_points=MAX_POINTS)
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def expand_messages(question: str, point: str) -> list[dict[str, str]]:
    """The prompt that expands one point. It starts with what every point's prompt shares
    (instructions, question), so vLLM's prefix cache computes that once. The outline
    itself is left out: given it, the bundled 135M model recites it or writes another
    point; given the question and its one point, it stays on that point. The point comes
    last: put before an instruction, the model echoed it ("One point of the answer: ...")
    in 11 of 24 expansions of invented questions, against 1 of 24 this way. Leaving the
    outline out also lets a point start before the outline is finished."""
    user = f"Question: {question}\n\nWrite two or three sentences on this aspect only: {point}"
    return [{"role": "system", "content": EXPAND_SYSTEM}, {"role": "user", "content": user}]


_RUN_OF_SPACES = re.compile(" {2,}")
"""One space, as ``parse_outline`` keeps of them."""
_TITLE_SO_FAR = re.compile(r"1(\.( [A-Za-z][A-Za-z ,'&/-]*)?)?")


class FirstTitle:
    """The outline's first line, as the model writes it, as the first words of the
    client's answer ("1. Keep surfaces clear"), so the answer starts streaming with the
    outline's first token instead of after its first line and point 1's first token.

    Only what the outline's own pattern allows is shown ("1", "1.", then plain letters and
    a few marks, at most ``POINT_CHARS`` of them), a word once it is complete; anything
    else ends the title without showing more. ``shown`` is what was shown, so point 1's heading
    can go on from it. Iterating yields chunks shaped like the backend's."""

    def __init__(self, route: str) -> None:
        self._route = route
        self._line = ""
        self._open = True
        self.shown = ""
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()

    def feed(self, text: str) -> None:
        """More of the outline; only its first line is used."""
        if not self._open:
            return
        head, newline, _ = text.partition("\n")
        self._line += head
        if _TITLE_SO_FAR.fullmatch(self._line) and len(self._line) <= POINT_CHARS + 3:
            visible = self._visible(complete=bool(newline))
            if len(visible) > len(self.shown):
                self._queue.put_nowait(visible[len(self.shown) :])
                self.shown = visible
        elif self._line:
            self.end()
        if newline:
            self.end()

    def _visible(self, *, complete: bool) -> str:
        """The number, then whole words only: what ``parse_outline`` keeps of the line."""
        if not self._line.startswith("1. "):
            return self._line  # "1" or "1."
        title = _whole_words(_RUN_OF_SPACES.sub(" ", self._line[3:]), complete=complete)
        return f"1. {title}" if title else "1."

    def end(self) -> None:
        if self._open:
            self._open = False
            self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        while (piece := await self._queue.get()) is not None:
            if self._route == "chat":
                yield {"choices": [{"index": 0, "delta": {"content": piece}}]}
            else:
                yield {"choices": [{"index": 0, "text": piece}]}
