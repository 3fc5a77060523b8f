"""The raw SSE relay of the HTTP edge, on streams of any line endings cut anywhere.

The relay forwards only whole events: every piece it sends parses, on its own, into
whole events, and together they are the backend's stream. A stream cut before its
``[DONE]`` raises after its last whole event; a complete one never does.
"""

from __future__ import annotations

import itertools

import pytest
from fake_backend import ChunkedResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from leangate.backend.errors import BackendProtocolError
from leangate.backend.sse import EventParser
from leangate.middleware.app import _after_last_event, _RawRelay

ENDINGS = (b"\n", b"\r\n", b"\r")
SEPARATORS = (b"\n\n", b"\r\r", b"\n\r")
"""Two line endings in a row, in bytes: every blank line holds one of these."""


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


_text = (
    st.binary(max_size=30)
    .map(lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n"))
    .filter(lambda b: b"[DONE]" not in b)
)


@st.composite
def _streams(draw: st.DrawFn) -> bytes:
    """Events of one or more lines (data, comments, other fields), each line ended by
    any line ending, each event by a blank line; the last event ``[DONE]``."""
    out: list[bytes] = []
    for _ in range(draw(st.integers(0, 6))):
        lines = draw(st.lists(st.sampled_from([b"data: ", b"data:", b": ", b"id: "]), min_size=1))
        for field in lines:
            out.append(field + draw(_text) + draw(st.sampled_from(ENDINGS)))
        out.append(draw(st.sampled_from(ENDINGS)))
    out.append(b"data: [DONE]" + draw(st.sampled_from(ENDINGS)))
    out.append(draw(st.sampled_from(ENDINGS)))
    return _joined(out)


def _joined(lines: list[bytes]) -> bytes:
    """``lines`` joined, a ``\\r`` ending followed by a ``\\n`` one made ``\\r\\n`` (else
    the two would read as one line ending)."""
    data = b""
    for line in lines:
        if data.endswith(b"\r") and line.startswith(b"\n"):
            line = b"\r" + line  # "\r" + "\n" is a single line ending
        data += line
    return data


def _events(*pieces: bytes) -> list[bytes]:
    parser = EventParser()
    return [event for piece in pieces for event in parser.feed(piece)]


async def _relayed(chunks: list[bytes]) -> tuple[list[bytes], bool]:
    """The pieces the relay sent, and whether it raised at the end."""
    sent: list[bytes] = []
    try:
        async for piece in _RawRelay(ChunkedResponse(*chunks)).chunks():
            sent.append(piece)
    except BackendProtocolError:
        return sent, True
    return sent, False


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=60).map(lambda b: b.translate(bytes.maketrans(b"ab", b"\r\n"))))
def test_the_end_of_the_last_event_is_just_past_a_blank_line(data: bytes) -> None:
    end = _after_last_event(data)
    assert end == 0 or _events(data[:end]) == _events(data)
    rest = data[end:]
    assert not any(sep in rest for sep in SEPARATORS), (data, end)


@settings(max_examples=300, deadline=None)
@given(stream=_streams(), cuts=st.lists(st.integers(0, 600), max_size=20))
async def test_every_piece_sent_is_whole_events_and_all_are_sent(
    stream: bytes, cuts: list[int]
) -> None:
    sent, raised = await _relayed(_split(stream, cuts))
    assert not raised
    assert b"".join(sent).rstrip(b"\r\n") == stream.rstrip(b"\r\n")
    alone = [event for piece in sent for event in EventParser().feed(piece)]
    assert alone == _events(stream)


@settings(max_examples=300, deadline=None)
@given(stream=_streams(), cut=st.integers(0), cuts=st.lists(st.integers(0, 600), max_size=20))
async def test_a_stream_cut_before_done_raises_after_its_whole_events(
    stream: bytes, cut: int, cuts: list[int]
) -> None:
    done = stream.rindex(b"data: [DONE]")
    truncated = stream[: cut % (done + len(b"data: [DONE]"))]
    sent, raised = await _relayed(_split(truncated, cuts))
    assert raised
    assert stream.startswith(b"".join(sent))
    assert _events(b"".join(sent)) == [e for e in _events(truncated) if e != b"[DONE]"]


@pytest.mark.parametrize("ending", [b"\n\r\n", b"\n\r", b"\r\n\n", b"\r\r\n", b"\r\n\r\n"])
async def test_a_stream_ending_in_mixed_line_endings_is_complete(ending: bytes) -> None:
    sent, raised = await _relayed([b"data: {}\n\ndata: [DONE]" + ending])
    assert not raised
    assert _events(*sent) == [b"{}", b"[DONE]"]
