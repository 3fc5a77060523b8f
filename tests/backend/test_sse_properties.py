"""The SSE parser on arbitrary bytes, not only on well-formed streams
(``test_sse.py``): it never fails, and where the chunks split does not matter."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

from hypothesis import given, settings
from hypothesis import strategies as st

from leangate.backend.errors import BackendProtocolError
from leangate.backend.sse import DONE, EventParser, encode_event, iter_events

_bytes = st.binary(max_size=200).map(lambda b: b.translate(bytes.maketrans(b"abc", b"\r\n:")))
"""Arbitrary bytes, rich in line endings and colons."""
_cuts = st.lists(st.integers(0, 200), max_size=20)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _feed(pieces: list[bytes]) -> list[bytes]:
    parser = EventParser()
    return [event for piece in pieces for event in parser.feed(piece)]


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@settings(max_examples=400, deadline=None)
@given(data=_bytes, cuts=_cuts)
def test_any_bytes_parse_alike_however_they_are_cut(data: bytes, cuts: list[int]) -> None:
    assert _feed(_split(data, cuts)) == _feed([data])


@settings(max_examples=400, deadline=None)
@given(data=_bytes)
def test_an_event_is_the_data_of_its_lines(data: bytes) -> None:
    for event in _feed([data]):
        for line in event.split(b"\n"):
            assert b"\r" not in line
            assert line in data


@settings(max_examples=200, deadline=None)
@given(payloads=st.lists(st.binary(max_size=40)), cuts=_cuts)
async def test_iter_events_gives_the_payloads_before_done_or_raises(
    payloads: list[bytes], cuts: list[int]
) -> None:
    lines = [p.replace(b"\r", b"").replace(b"\n", b"") for p in payloads]
    stream = b"".join(encode_event(p) for p in lines)
    try:
        got = [p async for p in iter_events(_chunks(_split(stream, cuts)))]
    except BackendProtocolError:
        assert DONE not in lines
        return
    assert DONE in lines
    assert got == lines[: lines.index(DONE)]
