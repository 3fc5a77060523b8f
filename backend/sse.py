"""Reading and writing the Server-Sent Events framing OpenAI-compatible servers stream.

Inside leangate a stream is a sequence of event *payloads* (the JSON after ``data: ``);
the framing is parsed off where bytes arrive from the backend and written back only at the
HTTP edge, so stages never handle SSE syntax.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from leangate.backend.errors import BackendProtocolError

DONE = b"[DONE]"


class EventParser:
    """An incremental parser of the SSE framing (the WHATWG rules for ``data`` fields).

    Lines end in ``\\n``, ``\\r\\n`` or a lone ``\\r``; an empty line ends an event; an
    event's payload is its ``data`` lines joined by ``\\n``; comments, other fields and
    events without data are dropped. Chunks may split the input anywhere, a ``\\r\\n``
    included. Each byte is scanned a bounded number of times: a line that arrives in
    many pieces is joined once, when it ends.
    """

    __slots__ = ("_data", "_partial", "_skip_lf")

    def __init__(self) -> None:
        self._partial: list[bytes] = []
        """Pieces of the line not yet ended."""
        self._data: list[bytes] = []
        """Data lines of the event not yet ended."""
        self._skip_lf = False
        """The last chunk ended in ``\\r``: a ``\\n`` opening the next belongs to it."""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events ``chunk`` completes, in order."""
        if (
            chunk.endswith(b"\n\n")
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n", 6) == len(chunk) - 2
            and not (self._partial or self._data or self._skip_lf)
            and b"\r" not in chunk
        ):
            return [chunk[6:-2]]  # the usual chunk: exactly one one-line event
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 10:  # b"\n"
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if not lines:
            if rest:
                self._partial.append(rest)
            return []
        if self._partial:
            self._partial.append(lines[0])
            lines[0] = b"".join(self._partial)
            self._partial = []
        if rest:
            self._partial.append(rest)
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = []
            elif line.startswith(b"data: "):
                data.append(line[6:])
            elif line.startswith(b"data:"):
                data.append(line[5:])
            elif line == b"data":
                data.append(b"")
        self._data = data
        return events


async def iter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield each event's payload until ``[DONE]``.

    Raises ``BackendProtocolError`` if the stream ends before ``[DONE]``, so a cut-short
    answer can never be mistaken for a complete one.
    """
    parser = EventParser()
    async for chunk in chunks:
        for payload in parser.feed(chunk):
            if payload == DONE:
                return
            yield payload
    raise BackendProtocolError("the backend's stream ended before [DONE]")


def encode_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE_EVENT = encode_event(DONE)
