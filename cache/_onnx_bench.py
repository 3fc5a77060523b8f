"""Embedder micro-benchmark: ONNX Runtime against torch in one run, and coalescing.

``python -m leangate.cache._onnx_bench [--queries N] [--busy]``; the last line of output is
one JSON object. Single-query latencies are measured in interleaved rounds (the two runtimes
alternate query by query, in alternating order) so that load from other processes on the
machine falls on both alike; ``--busy`` keeps one core busy with a spinning process while
measuring. Texts are the ``similar`` questions of ``mock_data.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from leangate.cache.embedder import Embedder, EmbedderSettings
from leangate.cache.semantic_eval import default_data_dir, load_gptcache_pairs


def _texts(count: int) -> list[str]:
    path = default_data_dir() / "gptcache" / "mock_data.json"
    return [p.similar for p in load_gptcache_pairs(path)][:count]


@contextmanager
def _busy_core(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def _single(models: dict[str, Embedder], texts: list[str]) -> dict[str, float]:
    """p50/p90 of one ``encode([text])`` per runtime (wall and this thread's CPU time, which
    load from other processes inflates less), and of ``aencode`` (the cache's path)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    times |= {f"{name}_{kind}": [] for name in models for kind in ("cpu", "async")}
    names = list(models)

    async def one(model: Embedder, text: str) -> None:
        await model.aencode([text])

    loop = asyncio.new_event_loop()
    try:
        for i, text in enumerate(texts):
            for name in names if i % 2 == 0 else names[::-1]:
                start, cpu = time.perf_counter(), time.thread_time()
                models[name].encode([text])
                times[name].append(time.perf_counter() - start)
                times[f"{name}_cpu"].append(time.thread_time() - cpu)
                start = time.perf_counter()
                loop.run_until_complete(one(models[name], text))
                times[f"{name}_async"].append(time.perf_counter() - start)
    finally:
        loop.close()
    out: dict[str, float] = {}
    for name, series in times.items():
        ranked = sorted(series)
        out[f"{name}_p50_ms"] = _ms(statistics.median(ranked))
        out[f"{name}_p90_ms"] = _ms(ranked[int(0.9 * len(ranked))])
    return out


def _throughput(models: dict[str, Embedder], texts: list[str]) -> dict[str, float]:
    out = {}
    for name, model in models.items():
        start = time.perf_counter()
        model.encode(texts)
        out[f"{name}_batch_texts_per_s"] = round(len(texts) / (time.perf_counter() - start), 1)
    return out


def _coalescing(
    model: Embedder, texts: list[str], concurrency: int, rounds: int
) -> dict[str, float]:
    """A burst of ``concurrency`` single-text ``aencode`` calls, against the same calls
    awaited one after the other."""

    async def burst(batch: list[str]) -> None:
        await asyncio.gather(*(model.aencode([t]) for t in batch))

    async def one_by_one(batch: list[str]) -> None:
        for t in batch:
            await model.aencode([t])

    def timed(run: Callable[[list[str]], Coroutine[Any, Any, None]], batch: list[str]) -> float:
        start = time.perf_counter()
        asyncio.run(run(batch))
        return time.perf_counter() - start

    bursts, serial, passes = [], [], []
    for r in range(rounds):
        batch = [texts[(r * concurrency + i) % len(texts)] for i in range(concurrency)]
        before = model.forward_passes
        bursts.append(timed(burst, batch))
        passes.append(model.forward_passes - before)
        serial.append(timed(one_by_one, batch))
    return {
        f"c{concurrency}_burst_ms": _ms(statistics.median(bursts)),
        f"c{concurrency}_one_by_one_ms": _ms(statistics.median(serial)),
        f"c{concurrency}_gain": round(statistics.median(serial) / statistics.median(bursts), 2),
        f"c{concurrency}_passes_per_burst": statistics.median(passes),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    parser.add_argument("--rounds", type=int, default=10, help="bursts per concurrency")
    args = parser.parse_args(argv)
    models = {
        "onnx": Embedder(settings=EmbedderSettings(backend="onnx")),
        "torch": Embedder(settings=EmbedderSettings(backend="torch")),
    }
    texts = _texts(max(args.queries, 256))
    for model in models.values():
        model.load()
        model.encode(texts[:64])  # warm-up
        for text in texts[:20]:
            model.encode([text])
    report: dict[str, object] = {"busy_core": args.busy, "load_avg_1m": os.getloadavg()[0]}
    with _busy_core(args.busy):
        report |= _single(models, texts[: args.queries])
        report |= _throughput(models, texts[:256])
        for concurrency in (8, 32):
            report |= _coalescing(models["onnx"], texts, concurrency, args.rounds)
    report["threads"] = models["onnx"].settings.thread_count()
    report["export"] = str(Path(models["onnx"].settings.export_root()))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
