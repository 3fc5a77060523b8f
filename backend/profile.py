"""What the backend costs now: prefill speed, decode speed by batch size, and load.

Cost-aware stages (compression, the planners) share one profile and ask ``predict``
whether their plan beats a direct answer. The model is deliberately small::

    latency(P, M, n) = overhead + n * P / prefill_tps + (M - 1) * step(b)
    step(b)          = step_base + step_per_seq * b,   b = load + n

for ``n`` parallel requests of ``P`` prompt tokens and ``M`` output tokens each. It is
learned, never assumed: from ``calibrate`` (a few probe requests: a long prompt with one
output token, one sequence decoding alone, eight together), and then from every streamed
sub-request the stages make (its time to first token, its length and how many sequences
the replica was running). ``load`` comes from the replicas' own ``/metrics`` (vLLM's
running and waiting requests, so other clients count too) and the proxy's outstanding
requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from leangate.backend.sse import iter_events

if TYPE_CHECKING:
    from leangate.backend.client import BackendClient

log = logging.getLogger(__name__)

RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog near the riverbank. "


@dataclass(frozen=True, slots=True)
class Sample:
    """One finished request: its sizes, timings, and the sequences decoding beside it."""

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    batch: float


@dataclass(frozen=True, slots=True)
class Estimate:
    overhead_s: float
    prefill_tps: float
    step_base_s: float
    step_per_seq_s: float

    def step_s(self, batch: float) -> float:
        return self.step_base_s + self.step_per_seq_s * max(batch, 1.0)


class BackendProfile:
    """See the module docstring. Starts from rough priors that any sample overrides."""

    def __init__(self, window: int = 256) -> None:
        self._prefill: deque[tuple[float, float]] = deque(maxlen=window)  # (P, ttft)
        self._decode: deque[tuple[float, float]] = deque(maxlen=window)  # (batch, step)
        self.estimate = Estimate(0.05, 2000.0, 0.04, 0.005)
        self.samples = 0
        self.reported_load = 0.0
        """Running plus waiting requests on the replicas, from their /metrics."""

    # --- learning ----------------------------------------------------------------------------

    def observe(self, sample: Sample) -> None:
        if sample.prompt_tokens > 0 and sample.ttft_s > 0:
            self._prefill.append((float(sample.prompt_tokens), sample.ttft_s))
        if sample.completion_tokens >= 2 and sample.total_s > sample.ttft_s:
            step = (sample.total_s - sample.ttft_s) / (sample.completion_tokens - 1)
            self._decode.append((max(sample.batch, 1.0), step))
        self.samples += 1
        self._refit()

    def _refit(self) -> None:
        old = self.estimate
        overhead, per_token = _line(self._prefill, old.overhead_s, 1.0 / old.prefill_tps)
        base, per_seq = _line(self._decode, old.step_base_s, old.step_per_seq_s)
        self.estimate = Estimate(
            overhead_s=max(overhead, 0.0),
            prefill_tps=1.0 / max(per_token, 1e-6),
            step_base_s=max(base, 1e-4),
            step_per_seq_s=max(per_seq, 0.0),
        )

    # --- predicting --------------------------------------------------------------------------

    def predict(
        self,
        prompt_tokens: int,
        max_tokens: int,
        parallel: int = 1,
        load: float | None = None,
    ) -> float:
        """Seconds until the last of ``parallel`` requests of this size finishes."""
        e = self.estimate
        batch = (self.reported_load if load is None else load) + parallel
        prefill = e.overhead_s + parallel * prompt_tokens / e.prefill_tps
        return prefill + max(max_tokens - 1, 0) * e.step_s(batch)

    # --- measuring ---------------------------------------------------------------------------

    async def calibrate(self, backend: BackendClient, model: str, *, quick: bool = False) -> None:
        """Probe the backend: prefill at two prompt sizes, decoding alone and eight at once."""
        long_prompt = PROBE_TEXT * (40 if quick else 80)
        tokens = 16 if quick else 32
        for prompt in (PROBE_TEXT * 4, long_prompt):
            self.observe(await timed_request(backend, model, prompt, 1))
        self.observe(await timed_request(backend, model, "Count to fifty.", tokens))
        eight = await asyncio.gather(
            *(timed_request(backend, model, f"Say {i} words.", tokens) for i in range(8))
        )
        for sample in eight:
            self.observe(sample)

    def read_metrics(self, texts: Iterable[str]) -> None:
        """Take the load from the replicas' Prometheus texts."""
        self.reported_load = sum(_gauge_sum(t, (RUNNING_METRIC, WAITING_METRIC)) for t in texts)


def _line(points: Iterable[tuple[float, float]], a: float, b: float) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; with a single distinct x, keep the slope and move
    the intercept; with no points, keep both."""
    data = np.array(list(points), dtype=float)
    if data.size == 0:
        return a, b
    xs, ys = data[:, 0], data[:, 1]
    if np.ptp(xs) < 1e-9:
        return float(np.median(ys - b * xs)), b
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(intercept), float(slope)


def _gauge_sum(text: str, names: tuple[str, ...]) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] not in names:
            continue
        try:
            total += float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
    return total


async def timed_request(backend: BackendClient, model: str, prompt: str, max_tokens: int) -> Sample:
    """One streamed chat request that generates exactly ``max_tokens`` tokens, timed."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    response = await backend.send(
        "/v1/chat/completions", json.dumps(body).encode(), model=model, stream=True
    )
    first: float | None = None
    usage: dict[str, Any] = {}
    batches: list[int] = []
    try:
        async for payload in iter_events(response.iter_chunks()):
            chunk = json.loads(payload)
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - started
                batches.append(backend.outstanding(model))
            usage = chunk.get("usage") or usage
    finally:
        batches.append(backend.outstanding(model))
        await response.aclose()
    total = time.perf_counter() - started
    return Sample(
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        ttft_s=first if first is not None else total,
        total_s=total,
        batch=float(np.mean(batches)),
    )
