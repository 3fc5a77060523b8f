"""The HTTP edge's raw relay of backend streams: only whole events go out."""

from __future__ import annotations

import pytest
from fake_backend import ChunkedResponse

from leangate.backend.errors import BackendProtocolError
from leangate.middleware.app import _after_last_event, _RawRelay


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"data: x", 0),
        (b"data: x\n\n", 9),
        (b"data: x\n\ndata: y", 9),
        (b"data: x\r\n\r\ndata: y", 11),
        (b"data: x\r\rdata", 9),
        (b"data: x\rdata", 0),
    ],
)
def test_the_end_of_the_last_whole_event(data: bytes, end: int) -> None:
    assert _after_last_event(data) == end


async def test_events_split_across_chunks_are_forwarded_whole() -> None:
    chunks = (b'data: {"a"', b':1}\n\ndata: {"b":2}\n', b"\ndata: [DONE]\n\n")
    relay = _RawRelay(ChunkedResponse(*chunks))
    sent = [chunk async for chunk in relay.chunks()]
    assert sent == [b'data: {"a":1}\n\n', b'data: {"b":2}\n\ndata: [DONE]\n\n']


async def test_a_stream_without_done_raises_after_its_whole_events() -> None:
    relay = _RawRelay(ChunkedResponse(b'data: {"a":1}\n\ndata: {"b"'))
    sent = []
    with pytest.raises(BackendProtocolError):
        async for chunk in relay.chunks():
            sent.append(chunk)
    assert sent == [b'data: {"a":1}\n\n']
