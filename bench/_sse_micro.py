"""Micro-benchmark of the SSE parser on a vLLM-shaped 200-event stream (not a product command).

    python -m leangate.bench._sse_micro [--parser-file OLD_SSE.py]

prints, for each way the stream can arrive (one event per chunk as vLLM writes it; 4 KiB
chunks as a loaded proxy reads it; ``\\r\\n`` line endings), the median and best time of one
whole stream through ``iter_events``, in microseconds. ``--parser-file`` loads
``iter_events`` from another file (e.g. ``git show REV:backend/sse.py``) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable

from leangate.backend import sse

IterEvents = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]


def vllm_events(count: int = 200) -> list[bytes]:
    """Events shaped like vLLM's chat chunks, ``data: [DONE]`` last."""
    events = []
    for i in range(count):
        chunk = {
            "id": "chatcmpl-ac000568fc8f7363",
            "object": "chat.completion.chunk",
            "created": 1795332741,
            "model": "SmolLM2-135M-Instruct",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": f" word{i}"},
                    "logprobs": None,
                    "finish_reason": None,
                    "token_ids": None,
                }
            ],
        }
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    return [*events, b"data: [DONE]\n\n"]


def arrivals() -> dict[str, list[bytes]]:
    events = vllm_events()
    joined = b"".join(events)
    return {
        "one_event_per_chunk": events,
        "4k_chunks": [joined[i : i + 4096] for i in range(0, len(joined), 4096)],
        "crlf_one_event_per_chunk": [e.replace(b"\n", b"\r\n") for e in events],
    }


async def _source(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _time_one(iter_events: IterEvents, chunks: list[bytes]) -> float:
    start = time.perf_counter()
    count = 0
    async for _ in iter_events(_source(chunks)):
        count += 1
    elapsed = time.perf_counter() - start
    if count != 200:
        raise RuntimeError(f"parsed {count} events, expected 200")
    return elapsed


async def measure(iter_events: IterEvents, repeats: int) -> dict[str, dict[str, float]]:
    result = {}
    for name, chunks in arrivals().items():
        times = [await _time_one(iter_events, chunks) for _ in range(repeats)]
        result[name] = {
            "median_us": round(statistics.median(times) * 1e6, 1),
            "best_us": round(min(times) * 1e6, 1),
        }
    return result


def _load(path: str | None) -> IterEvents:
    if path is None:
        return sse.iter_events
    spec = importlib.util.spec_from_file_location("sse_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded: IterEvents = module.iter_events
    return loaded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parser-file", default=None)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    result = asyncio.run(measure(_load(args.parser_file), args.repeats))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
