"""Skeleton-of-Thought's token caps per point: staggered so the points end together."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from leangate.planners.sot import MIN_POINT_TOKENS, staggered_caps


def test_each_later_point_gets_one_outline_line_fewer() -> None:
    caps = staggered_caps(400, 6, 8, 6)
    assert sum(caps) == 400
    # point k starts one line (8 steps) after point k-1: all end within a few steps
    ends = [k * 8 + cap for k, cap in enumerate(caps)]
    assert max(ends) - min(ends) <= 3
    assert caps[-1] < 400 / 6 < caps[0]


def test_without_outline_cost_the_cap_is_shared_evenly() -> None:
    assert staggered_caps(400, 4, 0, 4) == [100, 100, 100, 100]


@given(
    total=st.integers(32, 4096),
    points=st.floats(1, 8),
    line=st.floats(0, 20),
    count=st.integers(1, 8),
)
def test_caps_stay_within_the_answers_cap(
    total: int, points: float, line: float, count: int
) -> None:
    caps = staggered_caps(total, points, line, count)
    assert len(caps) == count
    assert all(cap >= MIN_POINT_TOKENS for cap in caps)
    assert caps == sorted(caps, reverse=True)
    assert sum(caps) <= total + MIN_POINT_TOKENS * count
