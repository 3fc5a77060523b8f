"""Outlines are model output: parsed as bounded data, whatever the model wrote."""

from __future__ import annotations

import asyncio
import re

from hypothesis import given
from hypothesis import strategies as st

from leangate.planners.skeleton import (
    MAX_POINTS,
    MIN_POINTS,
    POINT_CHARS,
    FirstTitle,
    Outline,
    PointReader,
    expand_messages,
    parse_outline,
    skeleton_regex,
)


def test_a_plain_outline_parses() -> None:
    text = "1. Plan the week\n2. Set priorities\n3) Limit distractions\n4. Rest well\n"
    outline = parse_outline(text)
    assert outline == Outline(
        ("Plan the week", "Set priorities", "Limit distractions", "Rest well")
    )


def test_too_few_duplicate_or_empty_points_are_no_outline() -> None:
    assert parse_outline("1. Only one\n2. Only one\n3. only one.\n4. ...\n") is None
    assert parse_outline("no list at all") is None


def test_the_regex_accepts_outlines_and_refuses_prose() -> None:
    pattern = re.compile(skeleton_regex(MIN_POINTS, 6))
    assert pattern.fullmatch("1. Sleep well\n2. Eat well\n3. Move daily\n4. Breathe slowly\n")
    assert not pattern.fullmatch("1. Sleep well\n2. Eat well\n")
    assert not pattern.fullmatch("1. Sleep 8 hours. 2. Eat\n2. a\n3. b\n4. c\n")


@given(st.text(max_size=3000))
def test_any_model_output_gives_a_bounded_outline_or_none(text: str) -> None:
    outline = parse_outline(text)
    if outline is None:
        return
    assert MIN_POINTS <= len(outline.points) <= MAX_POINTS
    for point in outline.points:
        assert 0 < len(point) <= POINT_CHARS
        assert "\n" not in point and "<" not in point and "{" not in point
    lowered = [p.lower() for p in outline.points]
    assert len(set(lowered)) == len(lowered)


@given(st.lists(st.text(min_size=1, max_size=200), min_size=MIN_POINTS, max_size=20))
def test_hostile_points_stay_quoted_data(points: list[str]) -> None:
    text = "".join(f"{i}. {p}\n" for i, p in enumerate(points, 1))
    outline = parse_outline(text)
    if outline is None:
        return
    messages = expand_messages("Why?", outline.points[0])
    assert [m["role"] for m in messages] == ["system", "user"]
    other = expand_messages("Why?", outline.points[1])[1]["content"]
    shared = "Question: Why?\n\nWrite two or three sentences on this aspect only: "
    assert messages[1]["content"].startswith(shared) and other.startswith(shared)


def test_points_are_read_as_their_lines_complete() -> None:
    reader = PointReader(max_points=3)
    assert reader.feed("1. Plan the") == []
    assert reader.feed(" week\n2. Plan the week\n2. Rest") == ["Plan the week"]
    assert reader.feed("\n3. Eat well\n4. Move") == ["Rest", "Eat well"]
    assert reader.full
    assert reader.close() == []
    assert reader.points == ["Plan the week", "Rest", "Eat well"]


async def _shown(title: FirstTitle) -> str:
    title.end()
    return "".join([c["choices"][0]["delta"]["content"] async for c in title])


def test_the_first_title_streams_as_it_is_written() -> None:
    title = FirstTitle("chat")
    shown = []
    for piece in ["1", ".", " Keep", " surfaces", " clear, ", "\n2. Other"]:
        title.feed(piece)
        shown.append(title.shown)
    assert shown == ["1", "1.", "1.", "1. Keep", *["1. Keep surfaces clear"] * 2]
    assert asyncio.run(_shown(title)) == "1. Keep surfaces clear"


@given(st.lists(st.text(max_size=40), max_size=8))
def test_the_first_title_shows_only_plain_words(pieces: list[str]) -> None:
    title = FirstTitle("chat")
    for piece in pieces:
        title.feed(piece)
    shown = asyncio.run(_shown(title))
    assert shown == title.shown
    assert shown == "" or re.fullmatch(r"1(\.( [A-Za-z][A-Za-z ,'&/-]*)?)?", shown)
    assert len(shown) <= POINT_CHARS + 3


def test_a_title_cut_by_the_length_bound_loses_its_cut_word() -> None:
    line = "Learn about productivity-enhancing"[:POINT_CHARS]
    outline = parse_outline(f"1. {line}\n2. Sleep\n3. Eat\n4. Move\n")
    assert outline is not None and outline.points[0] == "Learn about"
    title = FirstTitle("chat")
    title.feed(f"1. {line}\n")
    assert title.shown == "1. Learn about"
