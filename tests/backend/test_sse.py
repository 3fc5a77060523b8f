"""The SSE parser: any line-ending style, any chunk split, linear in the input."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leangate.backend.errors import BackendProtocolError
from leangate.backend.sse import DONE, encode_event, iter_events

ENDINGS = (b"\n", b"\r\n", b"\r")


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _parse(parts: list[bytes]) -> list[bytes]:
    return [payload async for payload in iter_events(_chunks(parts))]


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# A payload is one or more data lines; a line holds anything but a line ending.
_line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"x").replace(b"\n", b"y"))
_payload_lines = st.lists(_line, min_size=1, max_size=3).filter(lambda ls: ls != [DONE])
_extra = st.sampled_from([b": keep-alive", b"event: message", b"id: 7", b"retry: 10", b":"])


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[bytes], bytes]:
    """(stream, payloads, the line ending that dispatches ``[DONE]``)."""
    style = draw(st.sampled_from([*ENDINGS, b"mixed"]))
    out: list[bytes] = []
    last_ending = b""

    def line(text: bytes) -> None:
        nonlocal last_ending
        ending = style if style != b"mixed" else draw(st.sampled_from(ENDINGS))
        if last_ending == b"\r" and not text and ending == b"\n":
            ending = b"\r\n"  # "\r" + "\n" would be one line ending, not two
        out.append(text + ending)
        last_ending = ending

    payloads = []
    for lines in draw(st.lists(_payload_lines, max_size=8)):
        for extra in draw(st.lists(_extra, max_size=2)):
            line(extra)
        for text in lines:
            line((b"data:" if text[:1] != b" " and draw(st.booleans()) else b"data: ") + text)
        line(b"")
        payloads.append(b"\n".join(lines))
    line(b"data: [DONE]")
    line(b"")
    return b"".join(out), payloads, last_ending


@settings(max_examples=300, deadline=None)
@given(stream=_streams(), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
async def test_any_endings_and_any_chunk_split_give_the_same_payloads(
    stream: tuple[bytes, list[bytes], bytes], cuts: list[int]
) -> None:
    data, payloads, _ = stream
    assert await _parse(_split(data, cuts)) == payloads
    assert await _parse([data + b"data: after the end\n\n"]) == payloads


@settings(max_examples=300, deadline=None)
@given(stream=_streams(), cut=st.integers(min_value=0), cuts=st.lists(st.integers(0, 2000)))
async def test_a_stream_cut_before_done_is_an_error(
    stream: tuple[bytes, list[bytes], bytes], cut: int, cuts: list[int]
) -> None:
    data, _, final_ending = stream
    truncated = data[: cut % (len(data) - len(final_ending) + 1)]
    with pytest.raises(BackendProtocolError):
        await _parse(_split(truncated, cuts))


async def test_crlf_split_between_chunks_keeps_events_apart() -> None:
    parts = [b"data: a\r\n\r", b"\ndata: b\r\n\r\n", b"data: [DONE]\r\n\r\n"]
    assert await _parse(parts) == [b"a", b"b"]


async def test_lone_cr_line_endings() -> None:
    parts = [b"data: a\r\rdata: b\rdata: c\r\r", b"data: [DONE]\r\r"]
    assert await _parse(parts) == [b"a", b"b\nc"]


async def test_a_long_line_in_small_chunks_is_parsed_in_linear_time() -> None:
    payload = b"x" * (2 << 20)
    parts = _split(encode_event(payload) + encode_event(DONE), list(range(0, 2 << 20, 64)))
    started = time.perf_counter()
    assert await _parse(parts) == [payload]
    assert time.perf_counter() - started < 3.0
