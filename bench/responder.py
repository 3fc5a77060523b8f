"""Minimal, fast OpenAI-compatible responder used to isolate the proxy's overhead.

A raw :class:`asyncio.Protocol` on uvloop (when available) with a hand-rolled
HTTP/1.1 parser: no framework, no per-request allocations beyond the JSON body, so
its own latency is as small and steady as Python allows.  It answers

* ``GET /health`` and ``GET /v1/models`` (one model, ``--model``);
* ``POST /v1/chat/completions`` and ``POST /v1/completions``: a small fixed answer,
  or with ``"stream": true`` a few SSE chunks (chunked transfer encoding) followed
  by ``data: [DONE]``.  The model name is echoed from the request;
* ``GET /stats``: connections accepted and requests answered so far, so a benchmark
  can tell how many backend connections a proxy opens per request.

Like vLLM (whose uvicorn writes the end of a chunked body on its own), the chunked
body's terminator is written separately, after ``data: [DONE]``: a client that stops
reading at ``[DONE]`` has not reached the end of the body yet.

Run: ``python -m leangate.bench.responder --port P [--model NAME]``.
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


@dataclass
class ResponderStats:
    """What the responder has seen; served as JSON by ``GET /stats``."""

    connections_opened: int = 0
    requests: int = 0
    streams: int = 0
    streams_cut: int = 0
    """Streams whose client went away before the end of the body."""

    def as_json(self) -> bytes:
        return json.dumps(self.__dict__, separators=_COMPACT).encode()


class Responder:
    """Builds the OpenAI-shaped bodies; independent of the transport."""

    def __init__(self, config: ResponderConfig) -> None:
        self.config = config
        self.stats = ResponderStats()
        self._counter = 0
        words = config.completion_text.split(" ")
        n = max(1, min(config.stream_chunks, len(words)))
        bounds = [round(i * len(words) / n) for i in range(n + 1)]
        self._pieces = [
            " ".join(words[a:b]) + (" " if b < len(words) else "")
            for a, b in itertools.pairwise(bounds)
        ]
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

    def _usage(self) -> dict[str, int]:
        completion = len(self._pieces)
        return {"prompt_tokens": 8, "completion_tokens": completion, "total_tokens": 8 + completion}

    def completion(self, chat: bool, model: str) -> bytes:
        """Non-streaming JSON body."""
        if chat:
            choice: dict[str, object] = {
                "index": 0,
                "message": {"role": "assistant", "content": self.config.completion_text},
                "logprobs": None,
                "finish_reason": "stop",
            }
            obj, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {
                "index": 0,
                "text": self.config.completion_text,
                "logprobs": None,
                "finish_reason": "stop",
            }
            obj, prefix = "text_completion", "cmpl"
        body = {
            "id": self._next_id(prefix),
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": self._usage(),
        }
        return json.dumps(body, separators=_COMPACT).encode()

    def stream_events(self, chat: bool, model: str, include_usage: bool) -> list[bytes]:
        """SSE events (each ``data: ...\\n\\n``), the last one ``data: [DONE]``."""
        ident = self._next_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        last = len(self._pieces) - 1

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
        for i, piece in enumerate(self._pieces):
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
                "usage": self._usage(),
            }
            events.append(_sse(usage_event))
        events.append(b"data: [DONE]\n\n")
        return events


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
)


class _HTTPProtocol(asyncio.Protocol):
    """One client connection: parses keep-alive HTTP/1.1 requests, answers them."""

    def __init__(self, responder: Responder) -> None:
        self._responder = responder
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        # A paced (delayed-chunk) stream is in flight: hold further requests back.
        self._streaming = False
        self._close_after_stream = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement, but do not subclass, asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._responder.stats.connections_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        while self._transport is not None and not self._streaming and self._handle_one():
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
            if self._streaming:
                self._close_after_stream = True
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
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("body is not an object")
        except ValueError as exc:
            transport.write(_error(400, f"invalid JSON body: {exc}", close))
            return
        model = str(request.get("model") or self._responder.config.model)
        if not request.get("stream"):
            transport.write(_response(200, self._responder.completion(chat, model), close=close))
            return
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        events = self._responder.stream_events(chat, model, include_usage)
        self._stream(transport, events, close)

    def _stream(self, transport: asyncio.Transport, events: list[bytes], close: bool) -> None:
        """Unpaced: all events in one write; paced: one event per interval. Either way
        the end of the body follows in a write of its own."""
        self._responder.stats.streams += 1
        head = _STREAM_HEAD + (b"connection: close\r\n" if close else b"") + b"\r\n"
        interval = self._responder.config.chunk_interval_ms / 1000.0
        if interval <= 0:
            transport.write(head + b"".join(_chunk(e) for e in events))
            rest = [_END_OF_BODY]
        else:
            transport.write(head + _chunk(events[0]))
            rest = [_chunk(e) for e in events[1:]] + [_END_OF_BODY]
        self._streaming = True
        self._schedule(transport, rest, interval)

    def _schedule(self, transport: asyncio.Transport, rest: list[bytes], interval: float) -> None:
        delay = interval
        end_delay_ms = self._responder.config.end_delay_ms
        if len(rest) == 1 and end_delay_ms is not None:
            delay = end_delay_ms / 1000.0
        if delay > 0:
            self._loop.call_later(delay, self._continue_stream, transport, rest, interval)
        else:
            self._loop.call_soon(self._continue_stream, transport, rest, interval)

    def _continue_stream(
        self, transport: asyncio.Transport, rest: list[bytes], interval: float
    ) -> None:
        if transport.is_closing():
            self._responder.stats.streams_cut += 1
            self._streaming = False
            return
        transport.write(rest.pop(0))
        if rest:
            self._schedule(transport, rest, interval)
            return
        self._streaming = False
        if self._close_after_stream:
            transport.close()
            return
        self._drain()


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    config = ResponderConfig(
        model=args.model,
        stream_chunks=args.stream_chunks,
        chunk_interval_ms=args.chunk_interval_ms,
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
