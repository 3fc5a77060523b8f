"""``leangate bench profile``: the backend profile's predictions, and fan-out overlap.

Two parts, on the real backend:

1. *prediction*: the profile is calibrated (a few probe requests), then frozen; direct
   requests over a grid of prompt sizes and output lengths are predicted, then sent (one at
   a time, in interleaved rounds, generating exactly ``max_tokens`` tokens). Reported: the
   median relative error, and the same for a profile that also learns online from each
   request after predicting it.
2. *fan-out*: a proxy runs ``FanoutProbe``, a stage that sends 8 sub-requests at once
   through the platform's sub-request API and reports each one's time; the same 8 requests
   are also sent to vLLM one after another. Reported: wall time over the longest of the 8
   (1.0 = perfect overlap) and the speed-up over sequential, medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.profile import BackendProfile, timed_request
from leangate.backend.tokenizer import Tokenizer
from leangate.middleware.answers import whole_answer
from leangate.middleware.context import JsonResult, RequestContext, Result
from leangate.middleware.pipeline import Handler
from leangate.middleware.services import Services
from leangate.middleware.subrequests import Part

from .common import (
    add_common_arguments,
    backend_urls,
    log,
    machine_info,
    resolve_rounds,
    rounded,
    spawn_proxy,
)

FANOUT_HEADER = "x-leangate-fanout"
TOPICS = ("lighthouse", "glacier", "violin", "orchard", "comet", "harbor", "desert", "library")
FILLER = (
    "Rivers carve valleys over millions of years while wind shapes the dunes of the desert. "
    "Farmers rotate crops to keep the soil healthy and plant trees along the field edges. "
)


def probe_bodies(model: str, count: int, max_tokens: int) -> list[dict[str, Any]]:
    """``count`` different requests that each generate exactly ``max_tokens`` tokens."""
    return [
        {
            "model": model,
            "messages": [{"role": "user", "content": f"Tell a story about a {topic}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        for topic in (TOPICS * (count // len(TOPICS) + 1))[:count]
    ]


class FanoutProbe:
    """A measuring stage: sends ``count`` sub-requests at once and answers with their
    timings in the ``x-leangate-fanout`` header (streamed: joins their texts)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        count: int = Field(8, ge=1, le=64)
        max_tokens: int = Field(32, ge=1)

    default_budget_ms: ClassVar[float | None] = 50.0

    def __init__(self, name: str, settings: Settings, services: Services) -> None:
        self.name = name
        self.settings = settings

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        sub = ctx.subrequests
        bodies = probe_bodies(ctx.model, self.settings.count, self.settings.max_tokens)
        if ctx.stream:
            return sub.join([Part(sub.stream(body)) for body in bodies])

        async def timed(body: dict[str, Any]) -> float:
            started = time.perf_counter()
            await sub.complete(body)
            return time.perf_counter() - started

        started = time.perf_counter()
        durations = await asyncio.gather(*(timed(body) for body in bodies))
        wall = time.perf_counter() - started
        ctx.response_headers[FANOUT_HEADER] = json.dumps({"wall_s": wall, "each_s": durations})
        answer = whole_answer(ctx.route, ctx.model, "ok", "stop", ctx.scope.usage.as_dict())
        return JsonResult(orjson.dumps(answer))


FANOUT_POLICY = """
rules:
  - name: fanout
    stages:
      - use: "leangate.bench.profile:FanoutProbe"
        settings: {count: %d, max_tokens: %d}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=None, help="unused (no data needed)")
    parser.add_argument("--parts", default="prediction,fanout")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")


def run(args: argparse.Namespace) -> dict[str, object]:
    parts = set(args.parts.split(","))
    rounds = resolve_rounds(args, quick=2, full=3)
    result: dict[str, object] = {"benchmark": "profile", "quick": bool(args.quick)}
    started = time.perf_counter()
    with backend_urls(args) as urls:
        if "prediction" in parts:
            result.update(asyncio.run(_prediction(urls, args.model, rounds, quick=args.quick)))
        if "fanout" in parts:
            result.update(_fanout(urls, args.model, rounds))
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_info()
    return result


# --- 1. prediction ---------------------------------------------------------------------------


def _grid(quick: bool) -> list[tuple[int, int]]:
    """(filler repeats, max_tokens): prompts of about 30 to 1,400 tokens, 8 to 128 out."""
    repeats = (0, 8, 40) if quick else (0, 4, 16, 40)
    lengths = (8, 64) if quick else (8, 32, 128)
    return [(r, m) for r in repeats for m in lengths]


async def _prediction(
    urls: list[str], model: str, rounds: int, *, quick: bool
) -> dict[str, object]:
    client = BackendClient(BackendSettings(urls=urls, load_poll_s=0))
    await client.start()
    try:
        frozen = BackendProfile()
        log("calibrating the backend profile")
        await frozen.calibrate(client, model, quick=quick)
        online = BackendProfile()
        online.estimate = frozen.estimate
        tokenizer = Tokenizer(client)
        errors: list[float] = []
        online_errors: list[float] = []
        for _ in range(rounds):
            for repeats, max_tokens in _grid(quick):
                # A unique start keeps vLLM's prefix cache out: every prompt is prefilled cold.
                prompt = f"[{uuid.uuid4().hex}] Summarize this. {FILLER * repeats}"
                tokens = await tokenizer.count(
                    model, messages=[{"role": "user", "content": prompt}]
                )
                predicted = frozen.predict(tokens, max_tokens, load=0)
                predicted_online = online.predict(tokens, max_tokens, load=0)
                sample = await timed_request(client, model, prompt, max_tokens)
                online.observe(sample)
                errors.append(abs(predicted - sample.total_s) / sample.total_s)
                online_errors.append(abs(predicted_online - sample.total_s) / sample.total_s)
                log(
                    f"prompt {tokens:5d} tok, {max_tokens:4d} out: predicted "
                    f"{predicted:6.2f}s, measured {sample.total_s:6.2f}s"
                )
        e = frozen.estimate
        return {
            "prediction_median_abs_error": rounded(statistics.median(errors), 3),
            "prediction_p90_abs_error": rounded(_p90(errors), 3),
            "prediction_median_abs_error_online": rounded(statistics.median(online_errors), 3),
            "prediction_requests": len(errors),
            "profile_prefill_tokens_per_s": rounded(e.prefill_tps, 1),
            "profile_decode_ms_per_token_b1": rounded(e.step_s(1) * 1000, 2),
            "profile_decode_ms_per_step_b8": rounded(e.step_s(8) * 1000, 2),
            "profile_decode_ms_per_1k_context": rounded(e.step_per_ctx_s * 1e6, 2),
        }
    finally:
        await client.aclose()


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


# --- 2. fan-out ------------------------------------------------------------------------------


def _fanout(urls: list[str], model: str, rounds: int, count: int = 8) -> dict[str, object]:
    max_tokens = 32
    bodies = probe_bodies(model, count, max_tokens)
    overlap: list[float] = []
    speedup: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        policy = Path(folder) / "fanout.yaml"
        policy.write_text(FANOUT_POLICY % (count, max_tokens))
        with spawn_proxy(urls, policy=policy) as proxy, httpx.Client(timeout=600) as http:
            request = {"model": model, "messages": [{"role": "user", "content": "go"}]}
            for index in range(rounds + 1):  # the first round warms up
                response = http.post(f"{proxy.url}/v1/chat/completions", json=request)
                response.raise_for_status()
                timing = json.loads(response.headers[FANOUT_HEADER])
                sequential = 0.0
                for body in bodies:
                    t0 = time.perf_counter()
                    http.post(f"{urls[0]}/v1/chat/completions", json=body).raise_for_status()
                    sequential += time.perf_counter() - t0
                ratio = timing["wall_s"] / max(timing["each_s"])
                log(
                    f"fan-out round {index}: wall {timing['wall_s']:.2f}s, longest "
                    f"{max(timing['each_s']):.2f}s, sequential {sequential:.2f}s"
                )
                if index:
                    overlap.append(ratio)
                    speedup.append(sequential / timing["wall_s"])
    return {
        "fanout_overlap_ratio": rounded(statistics.median(overlap), 3),
        "fanout_speedup_vs_sequential": rounded(statistics.median(speedup), 2),
        "fanout_count": count,
        "fanout_max_tokens": max_tokens,
    }
