"""Reading and writing the Server-Sent Events framing OpenAI-compatible servers stream.

Inside leangate a stream is a sequence of event *payloads* (the JSON after ``data: ``);
the framing is parsed off where bytes arrive from the backend and written back only at the
HTTP edge, so stages never handle SSE syntax.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from leangate.backend.errors import BackendProtocolError

DONE = b"[DONE]"


def _payload(event: bytes) -> bytes | None:
    """The data of one event; None for comments and events without data."""
    lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    parts = [line[5:].removeprefix(b" ").rstrip(b"\r") for line in lines]
    return b"\n".join(parts)


async def iter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield each event's payload until ``[DONE]``.

    Raises ``BackendProtocolError`` if the stream ends before ``[DONE]``, so a cut-short
    answer can never be mistaken for a complete one.
    """
    buffer = b""
    async for chunk in chunks:
        buffer += chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            payload = _payload(buffer[:end])
            buffer = buffer[end + 2 :]
            if payload is None:
                continue
            if payload == DONE:
                return
            yield payload
    raise BackendProtocolError("the backend's stream ended before [DONE]")


def encode_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE_EVENT = encode_event(DONE)
