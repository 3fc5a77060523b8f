"""Minimal, fast OpenAI-compatible responder used to isolate the proxy's overhead.

A raw :class:`asyncio.Protocol` on uvloop (when available) with a hand-rolled
HTTP/1.1 parser: no framework, no per-request allocations beyond the JSON body, so
its own latency is as small and steady as Python allows.  It answers

* ``GET /health`` and ``GET /v1/models`` (one model, ``--model``);
* ``POST /v1/chat/completions`` and ``POST /v1/completions``: a small fixed answer,
  or with ``"stream": true`` a few SSE chunks (chunked transfer encoding) followed
  by ``data: [DONE]``.  The model name is echoed from the request;
* ``GET /stats``: connections accepted and requests answered so far, so a benchmark
  can tell how many backend connections a proxy opens per request; answers in progress
  (``active``), and those whose client left before their end (``answers_cut``,
  ``streams_cut``), so a fault test can tell that a proxy dropped the backend's work.

A request can slow its own answer (fault tests: a backend that is slow, or that is
killed mid-stream) with a body field the responder takes out of it::

    "responder": {"delay_ms": 2000, "chunks": 40, "chunk_interval_ms": 100, "text": "..."}

``delay_ms`` holds the whole answer (a stream's headers too) back; ``chunks`` streams the
text's words cycled to that many one-word chunks; ``text`` replaces the answer's text.

Like vLLM (whose uvicorn writes the end of a chunked body on its own), the chunked
body's terminator is written separately, after ``data: [DONE]``: a client that stops
reading at ``[DONE]`` has not reached the end of the body yet.

Run: ``python -m leangate.bench.responder --port P [--model NAME] [--delay-ms MS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
_MAX_HEADER_BYTES = 65536
_COMPACT = (",", ":")


@dataclass(frozen=True)
class ResponderConfig:
    """Behaviour of the responder."""

    model: str = "bench-model"
    completion_text: str = "Hello from the benchmark responder."
    stream_chunks: int = 4
    # Delay between SSE chunks after the first one: makes a proxy that buffers a
    # stream visible in time-to-first-token.  0 sends the whole stream at once.
    chunk_interval_ms: float = 0.0
    # Delay between "data: [DONE]" and the end of the chunked body; None: as any chunk
    # (unpaced: the next turn of the event loop).
    end_delay_ms: float | None = None
    # Delay before every completion's answer (a stream's headers included): a slow backend.
    answer_delay_ms: float = 0.0


def _response(
    status: int, body: bytes, content_type: bytes = b"application/json", close: bool = False
) -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
        status,
        _REASONS.get(status, b"Error"),
        content_type,
        len(body),
    )
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


def _error(status: int, message: str, close: bool = False) -> bytes:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
    return _response(status, json.dumps(body, separators=_COMPACT).encode(), close=close)


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=_COMPACT).encode() + b"\n\n"


_END_OF_BODY = b"0\r\n\r\n"


def _split(text: str, chunks: int) -> list[str]:
    """``text`` in at most ``chunks`` runs of whole words, each but the last ending in a
    space."""
    words = text.split(" ")
    n = max(1, min(chunks, len(words)))
    bounds = [round(i * len(words) / n) for i in range(n + 1)]
    pairs = itertools.pairwise(bounds)
    return [" ".join(words[a:b]) + (" " if b < len(words) else "") for a, b in pairs]


@dataclass
class ResponderStats:
    """What the responder has seen; served as JSON by ``GET /stats``."""

    connections_opened: int = 0
    requests: int = 0
    streams: int = 0
    streams_cut: int = 0
    """Streams whose client went away before the end of the body."""
    answers_cut: int = 0
    """Delayed plain answers whose client went away before the answer was written."""
    active: int = 0
    """Delayed answers and streams being answered now."""

    def as_json(self) -> bytes:
        return json.dumps(self.__dict__, separators=_COMPACT).encode()


class Responder:
    """Builds the OpenAI-shaped bodies; independent of the transport."""

    def __init__(self, config: ResponderConfig) -> None:
        self.config = config
        self.stats = ResponderStats()
        self._counter = 0
        self._pieces = _split(config.completion_text, config.stream_chunks)
        models = {
            "object": "list",
            "data": [
                {
                    "id": config.model,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "leangate-bench",
                    "root": config.model,
                    "parent": None,
                    "max_model_len": 2048,
                }
            ],
        }
        self.health_response = _response(200, b'{"status":"ok"}')
        self.models_response = _response(200, json.dumps(models, separators=_COMPACT).encode())

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-bench{self._counter:012d}"

    def pieces(self, text: str | None = None, chunks: int | None = None) -> list[str]:
        """The answer's stream chunks: the configured ones, or ``text`` (default: the
        configured text) split into ``stream_chunks``, or its words cycled to ``chunks``."""
        if chunks is None:
            return self._pieces if text is None else _split(text, self.config.stream_chunks)
        words = (text or self.config.completion_text).split(" ")
        return [words[i % len(words)] + (" " if i < chunks - 1 else "") for i in range(chunks)]

    def _usage(self, pieces: list[str]) -> dict[str, int]:
        completion = len(pieces)
        return {"prompt_tokens": 8, "completion_tokens": completion, "total_tokens": 8 + completion}

    def completion(self, chat: bool, model: str, pieces: list[str] | None = None) -> bytes:
        """Non-streaming JSON body (the text of ``pieces``, by default the configured)."""
        pieces = self._pieces if pieces is None else pieces
        text = "".join(pieces)
        if chat:
            choice: dict[str, object] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "stop",
            }
            obj, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            obj, prefix = "text_completion", "cmpl"
        body = {
            "id": self._next_id(prefix),
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": self._usage(pieces),
        }
        return json.dumps(body, separators=_COMPACT).encode()

    def stream_events(
        self, chat: bool, model: str, include_usage: bool, pieces: list[str] | None = None
    ) -> list[bytes]:
        """SSE events (each ``data: ...\\n\\n``), the last one ``data: [DONE]``."""
        pieces = self._pieces if pieces is None else pieces
        ident = self._next_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        last = len(pieces) - 1

        def event(choice: dict[str, object]) -> bytes:
            base: dict[str, object] = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }
            return _sse(base)

        events = []
        for i, piece in enumerate(pieces):
            finish = "stop" if i == last else None
            if chat:
                delta: dict[str, str] = {"content": piece}
                if i == 0:
                    delta = {"role": "assistant", "content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
            events.append(event(choice))
        if include_usage:
            usage_event = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [],
                "usage": self._usage(pieces),
            }
            events.append(_sse(usage_event))
        events.append(b"data: [DONE]\n\n")
        return events


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
)
_PACE_FIELDS = frozenset({"delay_ms", "chunk_interval_ms", "chunks", "text"})


@dataclass(frozen=True, slots=True)
class _Pace:
    """How one answer is paced, and what it says: the configuration's, or the request's
    ``responder`` field."""

    delay_s: float
    interval_s: float
    text: str | None = None
    chunks: int | None = None


def _pace(request: dict[str, object], config: ResponderConfig) -> _Pace:
    """The request's pace; its ``responder`` field is taken out of it. Raises ValueError."""
    options = request.pop("responder", None)
    delay_ms, interval_ms = config.answer_delay_ms, config.chunk_interval_ms
    if options is None:
        return _Pace(delay_ms / 1000.0, interval_ms / 1000.0)
    if not isinstance(options, dict) or not set(options) <= _PACE_FIELDS:
        raise ValueError(f"responder: an object of {', '.join(sorted(_PACE_FIELDS))}")
    try:
        delay_ms = float(options.get("delay_ms", delay_ms))
        interval_ms = float(options.get("chunk_interval_ms", interval_ms))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"responder: {exc}") from exc
    chunks, text = options.get("chunks"), options.get("text")
    if chunks is not None and (type(chunks) is not int or chunks < 1):
        raise ValueError("responder.chunks: a positive integer")
    if text is not None and (not isinstance(text, str) or not text):
        raise ValueError("responder.text: a non-empty string")
    return _Pace(max(delay_ms, 0.0) / 1000.0, max(interval_ms, 0.0) / 1000.0, text, chunks)


class _HTTPProtocol(asyncio.Protocol):
    """One client connection: parses keep-alive HTTP/1.1 requests, answers them."""

    def __init__(self, responder: Responder) -> None:
        self._responder = responder
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        # An answer is in progress (a delayed one, or a stream): hold further requests
        # back; ``_pending`` is its next scheduled write.
        self._busy = False
        self._busy_stream = False
        self._pending: asyncio.Handle | None = None
        self._close_after_answer = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement, but do not subclass, asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._responder.stats.connections_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._end_answer(cut=True)  # the client left first (a no-op when idle)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        while self._transport is not None and not self._busy and self._handle_one():
            pass

    def _handle_one(self) -> bool:
        """Handle one complete request from the buffer; False if more bytes needed."""
        transport = self._transport
        assert transport is not None
        buf = self._buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEADER_BYTES:
                transport.write(_error(400, "headers too large", close=True))
                transport.close()
            return False
        head = bytes(buf[:end]).split(b"\r\n")
        try:
            method, target, version = head[0].split(b" ", 2)
        except ValueError:
            transport.write(_error(400, "bad request line", close=True))
            transport.close()
            return False
        length = 0
        close = version == b"HTTP/1.0"
        for line in head[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"connection":
                lowered = value.strip().lower()
                close = lowered == b"close" or (close and lowered != b"keep-alive")
        total = end + 4 + length
        if len(buf) < total:
            return False
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        self._dispatch(transport, method, target.split(b"?", 1)[0], body, close)
        if close:
            if self._busy:
                self._close_after_answer = True
            else:
                transport.close()
        return True

    def _dispatch(
        self, transport: asyncio.Transport, method: bytes, path: bytes, body: bytes, close: bool
    ) -> None:
        responder = self._responder
        responder.stats.requests += 1
        if path == b"/health":
            transport.write(responder.health_response)
        elif path == b"/v1/models":
            transport.write(responder.models_response)
        elif path == b"/stats":
            transport.write(_response(200, responder.stats.as_json(), close=close))
        elif path in (b"/v1/chat/completions", b"/v1/completions"):
            if method != b"POST":
                transport.write(_error(405, "use POST", close))
                return
            self._completion(transport, path == b"/v1/chat/completions", body, close)
        else:
            transport.write(_error(404, f"no route {path.decode(errors='replace')}", close))

    def _completion(
        self, transport: asyncio.Transport, chat: bool, body: bytes, close: bool
    ) -> None:
        responder = self._responder
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("body is not an object")
            pace = _pace(request, responder.config)
        except ValueError as exc:
            transport.write(_error(400, f"invalid JSON body: {exc}", close))
            return
        model = str(request.get("model") or responder.config.model)
        pieces = responder.pieces(pace.text, pace.chunks)
        if not request.get("stream"):
            answer = _response(200, responder.completion(chat, model, pieces), close=close)
            if pace.delay_s <= 0:
                transport.write(answer)
            else:
                self._answer([answer], [pace.delay_s], stream=False)
            return
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        events = responder.stream_events(chat, model, include_usage, pieces)
        self._stream(events, close, pace)

    def _stream(self, events: list[bytes], close: bool, pace: _Pace) -> None:
        """Unpaced: all events in one write; paced: one event per interval. Either way
        the end of the body follows in a write of its own."""
        self._responder.stats.streams += 1
        head = _STREAM_HEAD + (b"connection: close\r\n" if close else b"") + b"\r\n"
        interval = pace.interval_s
        end_delay_ms = self._responder.config.end_delay_ms
        end_delay = interval if end_delay_ms is None else end_delay_ms / 1000.0
        if interval <= 0:
            parts = [head + b"".join(_chunk(e) for e in events), _END_OF_BODY]
            delays = [pace.delay_s, end_delay]
        else:
            parts = [head + _chunk(events[0]), *(_chunk(e) for e in events[1:]), _END_OF_BODY]
            delays = [pace.delay_s] + [interval] * (len(events) - 1) + [end_delay]
        self._answer(parts, delays, stream=True)

    def _answer(self, parts: list[bytes], delays: list[float], *, stream: bool) -> None:
        """Write ``parts[i]`` ``delays[i]`` seconds after the one before (0: at once for
        the first, at the next turn of the loop for the others)."""
        self._busy, self._busy_stream = True, stream
        self._responder.stats.active += 1
        if delays[0] > 0:
            self._pending = self._loop.call_later(delays[0], self._write_next, parts, delays)
        else:
            self._write_next(parts, delays)

    def _write_next(self, parts: list[bytes], delays: list[float]) -> None:
        self._pending = None
        transport = self._transport
        if transport is None or transport.is_closing():
            self._end_answer(cut=True)
            return
        transport.write(parts.pop(0))
        delays.pop(0)
        if parts:
            if delays[0] > 0:
                self._pending = self._loop.call_later(delays[0], self._write_next, parts, delays)
            else:
                self._pending = self._loop.call_soon(self._write_next, parts, delays)
            return
        self._end_answer(cut=False)
        if self._close_after_answer:
            transport.close()
            return
        self._drain()

    def _end_answer(self, *, cut: bool) -> None:
        if not self._busy:
            return
        self._busy = False
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        stats = self._responder.stats
        stats.active -= 1
        if cut and self._busy_stream:
            stats.streams_cut += 1
        elif cut:
            stats.answers_cut += 1


async def start_responder(
    config: ResponderConfig, host: str = "127.0.0.1", port: int = 0
) -> asyncio.Server:
    """Start serving on ``host:port`` in the running loop (port 0: any free port)."""
    responder = Responder(config)
    loop = asyncio.get_running_loop()
    factory: Callable[[], asyncio.Protocol] = lambda: _HTTPProtocol(responder)  # noqa: E731
    return await loop.create_server(factory, host, port, backlog=1024, reuse_address=True)


async def _serve(config: ResponderConfig, host: str, port: int) -> None:
    server = await start_responder(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"responder listening on http://{host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=ResponderConfig.model)
    parser.add_argument("--stream-chunks", type=int, default=ResponderConfig.stream_chunks)
    parser.add_argument(
        "--chunk-interval-ms", type=float, default=ResponderConfig.chunk_interval_ms
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=ResponderConfig.answer_delay_ms,
        help="hold every completion's answer back this long (a slow backend)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    config = ResponderConfig(
        model=args.model,
        stream_chunks=args.stream_chunks,
        chunk_interval_ms=args.chunk_interval_ms,
        answer_delay_ms=args.delay_ms,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        asyncio.run(_serve(config, args.host, args.port))
        return
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
