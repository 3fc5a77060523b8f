"""What the backend costs now: prefill speed, decode speed by batch size, and load.

Cost-aware stages (compression, the planners) share one profile and ask ``predict``
whether their plan beats a direct answer. The model is deliberately small::

    latency(P, M, n) = overhead + n * P / prefill_tps + (M - 1) * step(b, c)
    step(b, c)       = step_base + step_per_seq * b + step_per_ctx * c
    b = load + n,    c = n * (P + M / 2)   (tokens the batch attends to, on average)

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
import uuid
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
TRAFFIC_SAMPLES_TO_TRUST = 16
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
    step_per_ctx_s: float
    """Attention over a long context slows every decode step (per context token)."""

    def step_s(self, batch: float, context_tokens: float = 0.0) -> float:
        return (
            self.step_base_s
            + self.step_per_seq_s * max(batch, 1.0)
            + self.step_per_ctx_s * context_tokens
        )

    def decode_coefficients(self) -> np.ndarray:
        return np.array([self.step_base_s, self.step_per_seq_s, self.step_per_ctx_s])


DECODE_SCALE = np.array([1.0, 4.0, 1000.0])
"""Typical size of each decode feature (1, batch, context tokens), for the ridge prior."""
PRIOR_WEIGHT = 0.2
"""How many observations' worth the current estimate counts when refitting."""


class BackendProfile:
    """See the module docstring. Starts from rough priors that any sample overrides."""

    def __init__(self, window: int = 256) -> None:
        self._prefill: deque[tuple[float, float]] = deque(maxlen=window)  # (P, ttft)
        self._decode: deque[tuple[float, float, float]] = deque(maxlen=window)
        """(batch, context tokens, seconds per step)"""
        self.estimate = Estimate(0.05, 2000.0, 0.04, 0.005, 0.0)
        self.samples = 0
        self.calibrated = False
        """Set once ``calibrate`` ran or enough traffic was seen: before that, the
        estimate is a prior, and cost-aware stages should not act on it."""
        self.reported_load = 0.0
        """Running plus waiting requests on the replicas, from their /metrics."""

    # --- learning ----------------------------------------------------------------------------

    def observe(self, sample: Sample) -> None:
        # A first token that waited behind other sequences says little about prefill speed.
        if sample.prompt_tokens > 0 and sample.ttft_s > 0 and sample.batch <= 1.5:
            self._prefill.append((float(sample.prompt_tokens), sample.ttft_s))
        if sample.completion_tokens >= 2 and sample.total_s > sample.ttft_s:
            step = (sample.total_s - sample.ttft_s) / (sample.completion_tokens - 1)
            batch = max(sample.batch, 1.0)
            context = batch * (sample.prompt_tokens + sample.completion_tokens / 2)
            self._decode.append((batch, context, step))
        self.samples += 1
        self.calibrated = self.calibrated or self.samples >= TRAFFIC_SAMPLES_TO_TRUST
        self._refit()

    def _refit(self) -> None:
        old = self.estimate
        overhead, per_token = _line(self._prefill, old.overhead_s, 1.0 / old.prefill_tps)
        base, per_seq, per_ctx = _ridge(self._decode, old.decode_coefficients())
        self.estimate = Estimate(
            overhead_s=max(overhead, 0.0),
            prefill_tps=1.0 / max(per_token, 1e-6),
            step_base_s=max(base, 1e-4),
            step_per_seq_s=max(per_seq, 0.0),
            step_per_ctx_s=max(per_ctx, 0.0),
        )

    # --- predicting --------------------------------------------------------------------------

    def predict(
        self,
        prompt_tokens: int,
        max_tokens: int,
        parallel: int = 1,
        load: float | None = None,
        cached_tokens: int = 0,
    ) -> float:
        """Seconds until the last of ``parallel`` requests of this size finishes;
        ``cached_tokens`` of each prompt are expected in vLLM's prefix cache."""
        e = self.estimate
        batch = (self.reported_load if load is None else load) + parallel
        computed = max(prompt_tokens - cached_tokens, 1)
        prefill = e.overhead_s + parallel * computed / e.prefill_tps
        context = parallel * (prompt_tokens + max_tokens / 2)
        return prefill + max(max_tokens - 1, 0) * e.step_s(batch, context)

    # --- measuring ---------------------------------------------------------------------------

    async def calibrate(self, backend: BackendClient, model: str, *, quick: bool = False) -> None:
        """Probe the backend: prefill at two prompt sizes, decoding alone (with a short and
        a long context) and eight sequences at once. Single probes run twice: one noisy
        sample should not set the estimate."""
        long_prompt = PROBE_TEXT * (40 if quick else 80)
        tokens = 16 if quick else 32
        probes = [(PROBE_TEXT * 4, 1), (long_prompt, tokens), ("Count to fifty.", tokens)]
        for prompt, out in probes * 2:
            unique = f"[{uuid.uuid4().hex}] {prompt}"  # never a prefix-cache hit
            self.observe(await timed_request(backend, model, unique, out))
        eight = await asyncio.gather(
            *(timed_request(backend, model, f"Say {i} words.", tokens) for i in range(8))
        )
        for sample in eight:
            self.observe(sample)
        self.calibrated = True

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


def _ridge(points: Iterable[tuple[float, float, float]], prior: np.ndarray) -> np.ndarray:
    """Least squares ``step = w0 + w1 batch + w2 context``, pulled towards ``prior`` by
    ``PRIOR_WEIGHT`` observations' worth, so that a few samples at one batch size cannot
    send the other coefficients anywhere."""
    data = np.array(list(points), dtype=float).reshape(-1, 3)
    features = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    penalty = np.diag(np.sqrt(PRIOR_WEIGHT) * DECODE_SCALE)
    matrix = np.vstack([features, penalty])
    target = np.concatenate([data[:, 2], penalty @ prior])
    solution, *_ = np.linalg.lstsq(matrix, target, rcond=None)
    return np.asarray(solution)


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
    batches: list[float] = []
    try:
        async for payload in iter_events(response.iter_chunks()):
            chunk = json.loads(payload)
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - started
                batches.append(backend.batch_size(model))
            usage = chunk.get("usage") or usage
    finally:
        batches.append(backend.batch_size(model))
        await response.aclose()
    total = time.perf_counter() - started
    return Sample(
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        ttft_s=first if first is not None else total,
        total_s=total,
        batch=float(np.mean(batches)),
    )
