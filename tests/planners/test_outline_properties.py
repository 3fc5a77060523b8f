"""The SoT outline reader on any model output, however it is streamed: the points are
the same, bounded, plain text, and the first title shown agrees with the first point."""

from __future__ import annotations

import itertools
import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from leangate.planners.skeleton import (
    MAX_POINTS,
    POINT_CHARS,
    FirstTitle,
    PointReader,
    parse_outline,
)

PLAIN = re.compile(r"[\w ,;:'&()/+%.-]*")
"""What a point may hold: words and a few marks, one line."""

_lines = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda n, sep, title: f"{n}{sep} {title}",
        st.integers(0, 120),
        st.sampled_from([".", ")", ":"]),
        st.text(max_size=60),
    ),
)
_outputs = st.lists(_lines, max_size=14).map("\n".join)


def _split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(text)}), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _read(pieces: list[str], max_points: int = MAX_POINTS) -> list[str]:
    reader = PointReader(max_points)
    points = [p for piece in pieces for p in reader.feed(piece)]
    return points + reader.close()


@settings(max_examples=300, deadline=None)
@given(text=_outputs, cuts=st.lists(st.integers(0, 900), max_size=30))
def test_points_do_not_depend_on_how_the_outline_was_streamed(text: str, cuts: list[int]) -> None:
    assert _read(_split(text, cuts)) == _read([text])


@settings(max_examples=300, deadline=None)
@given(text=_outputs, max_points=st.integers(1, MAX_POINTS))
def test_points_are_few_short_distinct_plain_words(text: str, max_points: int) -> None:
    points = _read([text], max_points)
    assert len(points) <= max_points
    assert len({p.lower().rstrip(".") for p in points}) == len(points)
    for point in points:
        assert 0 < len(point) <= POINT_CHARS
        assert PLAIN.fullmatch(point), point
        assert point == point.strip(" .,;:-'&/")


_titles = st.text(alphabet="ab ,'&/-", min_size=1, max_size=40).map(lambda t: "a" + t)


@settings(max_examples=300, deadline=None)
@given(
    titles=st.lists(_titles, min_size=4, max_size=MAX_POINTS),
    cuts=st.lists(st.integers(0, 300), max_size=20),
)
def test_the_first_title_shown_is_where_point_one_starts(
    titles: list[str], cuts: list[int]
) -> None:
    """SoT's answer goes on from the title it showed: it must begin the first point's
    heading, whatever the outline's first line and however it arrived."""
    text = "".join(f"{i}. {title}\n" for i, title in enumerate(titles, 1))
    first = FirstTitle("chat")
    for piece in _split(text, cuts):
        first.feed(piece)
    outline = parse_outline(text)
    assume(outline is not None)
    assert outline is not None
    assert f"1. {outline.points[0]}".startswith(first.shown), (text, cuts)
