"""``leangate bench passthrough``: what does putting the proxy in the path cost?

Two parts, each comparing the proxy against the direct-to-backend baseline with
interleaved rounds (direct, proxy, direct, proxy, ...) after a warm-up:

1. *responder*: against the minimal responder (``bench/responder.py``), whose own
   latency is tiny and steady, so differences are the proxy's overhead: added p50 /
   p99 latency at concurrency 1, added time-to-first-token when streaming, the proxy
   process's CPU time per request (and a stream's extra over a plain request), the
   backend connections it opens per request (counted by the responder), and its
   capacity: maximum throughput at concurrency 64, as a ratio to the bare uvicorn +
   aiohttp relay (``bench/_relay.py``) run beside it against the same responder.
2. *vllm*: against the real vLLM server at concurrency 1 and 64 with identical work
   per request (``temperature 0``, ``ignore_eos``, fixed ``max_tokens``): throughput
   and p50-latency ratios proxy / direct (also as rows, ``by_concurrency``).

Differences and ratios are taken per round pair (each proxy round against the direct
round just before it) and the median over pairs is reported, which cancels the slow
drift of a shared machine.  The proxy runs a policy with no stage (override with
``--policy``), so it forwards every request instead of answering from a cache.  Only
the first backend URL is used: the direct baseline must hit exactly the server the
proxy forwards to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from .common import (
    BenchError,
    ClosedLoopClient,
    RawHTTPClient,
    SpawnedService,
    add_common_arguments,
    arun_interleaved,
    backend_urls,
    emit,
    free_port,
    log,
    machine_info,
    median,
    percentile,
    ratio,
    resolve_rounds,
    rounded,
    run_interleaved,
    sequential_round,
    spawn_proxy,
    spawn_responder,
    spawn_service,
    wait_for_http,
)

T = TypeVar("T")

PARTS = ("responder", "vllm")
RESPONDER_MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
VLLM_PROMPT = "Write a short poem about the sea."
# Streamed responder answers are paced so a proxy that buffers streams shows up in TTFT.
STREAM_CHUNK_INTERVAL_MS = 1.0
RESPONDER_STREAM_EVENTS = 4  # content events per streamed answer, then [DONE]
CAPACITY_CONCURRENCY = 64
# One rule matching everything, running no stage: the proxy's bare forwarding path.
# (Without --policy the proxy runs its default policy, which caches results: a cache
# hit would make the proxy look faster than the backend.)
PASSTHROUGH_POLICY = """\
version: 1
rules:
  - name: passthrough
    stages: []
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leangate bench passthrough``."""
    add_common_arguments(parser)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="comma-separated subset of: responder, vllm (default: both)",
    )
    parser.add_argument(
        "--requests-per-round",
        type=int,
        default=None,
        help="responder part: non-streaming requests per arm and round "
        "(default 1000 quick / 3000 full; streaming uses a fifth)",
    )
    parser.add_argument(
        "--policy",
        default=None,
        help="policy file for the proxy (default: a built-in policy that runs no stage)",
    )
    parser.add_argument(
        "--capacity-requests",
        type=int,
        default=None,
        help="responder part: requests per arm and round at concurrency 64 "
        "(default 2000 quick / 6000 full)",
    )
    parser.add_argument("--model", default=None, help="vLLM model (default: from /v1/models)")
    parser.add_argument("--max-tokens", type=int, default=16, help="vLLM part: max_tokens")
    parser.add_argument("--concurrency", type=int, default=64, help="vLLM part: high concurrency")
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=None,
        help="vLLM part: target duration of one arm's round (default 2 quick / 10 full)",
    )
    parser.add_argument(
        "--waves",
        type=int,
        default=None,
        help="vLLM part: requests per high-concurrency round, in multiples of "
        "--concurrency (default 1 quick; full: sized to --round-seconds)",
    )


# ------------------------------------------------------------------ round results


@dataclass(frozen=True)
class RoundStats:
    """Summary of one arm's round (times in milliseconds)."""

    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float
    elapsed_s: float
    cpu_s: float | None  # proxy CPU time over the round (None for the direct arm)
    backend_connections: int | None = None
    """Connections the responder accepted during the round (proxy arm only)."""

    @property
    def throughput(self) -> float:
        return ratio(self.requests, self.elapsed_s)


def _stats(
    latencies: list[float],
    ttfts: list[float],
    errors: int,
    elapsed_s: float,
    cpu_s: float | None,
) -> RoundStats:
    return RoundStats(
        requests=len(latencies),
        errors=errors,
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        ttft_p50_ms=percentile(ttfts, 50) * 1e3,
        elapsed_s=elapsed_s,
        cpu_s=cpu_s,
    )


def _with_proxy_cpu(
    proxy: SpawnedService, fn: Callable[[], RoundStats]
) -> Callable[[], RoundStats]:
    """Wrap a proxy-arm round so it records the proxy's CPU time during the round."""

    def wrapped() -> RoundStats:
        before = proxy.cpu_seconds()
        stats = fn()
        return _replace_cpu(stats, proxy.cpu_seconds() - before)

    return wrapped


def _replace_cpu(stats: RoundStats, cpu_s: float) -> RoundStats:
    return replace(stats, cpu_s=cpu_s)


class _ConnectionCounter:
    """Reads how many connections the responder has accepted (``GET /stats``), over a
    connection of its own opened once, so reading does not move the count."""

    def __init__(self, responder_url: str) -> None:
        self._client = RawHTTPClient(responder_url)
        self._request = self._client.build_request("GET", "/stats")
        self.opened()

    def opened(self) -> int:
        response = self._client.send(self._request)
        if response.status != 200:
            raise BenchError(f"responder GET /stats answered {response.status}")
        return int(json.loads(response.body)["connections_opened"])

    def counting(self, fn: Callable[[], RoundStats]) -> Callable[[], RoundStats]:
        def wrapped() -> RoundStats:
            before = self.opened()
            stats = fn()
            return replace(stats, backend_connections=self.opened() - before)

        return wrapped

    def close(self) -> None:
        self._client.close()


def _connections_per_request(rounds: list[RoundStats]) -> float:
    opened = sum(r.backend_connections or 0 for r in rounds)
    return ratio(opened, sum(r.requests + r.errors for r in rounds))


def _progress(index: int, arm: str, stats: RoundStats) -> None:
    label = "warm-up" if index < 0 else f"round {index + 1}"
    extra = "" if math.isnan(stats.ttft_p50_ms) else f" ttft_p50={stats.ttft_p50_ms:.3f}ms"
    log(
        f"  {label:>8} {arm:<6} n={stats.requests} err={stats.errors} "
        f"p50={stats.p50_ms:.3f}ms p99={stats.p99_ms:.3f}ms{extra} "
        f"rps={stats.throughput:.1f}"
    )


def _cpu_us_per_request(rounds: list[RoundStats]) -> float:
    cpu = sum(r.cpu_s or 0.0 for r in rounds)
    requests = sum(r.requests + r.errors for r in rounds)
    return ratio(cpu, requests) * 1e6


def _median_of(rounds: list[RoundStats], attr: str) -> float:
    return float(median([float(getattr(r, attr)) for r in rounds]))


def _paired_diff(direct: list[RoundStats], proxy: list[RoundStats], attr: str) -> float:
    """Median over rounds of proxy minus direct, pairing each round with its neighbour."""
    return median(
        [
            float(getattr(p, attr)) - float(getattr(d, attr))
            for d, p in zip(direct, proxy, strict=True)
        ]
    )


def _paired_ratio(direct: list[RoundStats], proxy: list[RoundStats], attr: str) -> float:
    """Median over rounds of proxy / direct, each proxy round against its neighbour.

    Pairing adjacent rounds cancels the slow drift of a shared machine, which a
    ratio of overall medians would not.
    """
    return median(
        [
            ratio(float(getattr(p, attr)), float(getattr(d, attr)))
            for d, p in zip(direct, proxy, strict=True)
        ]
    )


def _check_errors(results: dict[str, list[RoundStats]], part: str) -> int:
    errors = sum(r.errors for rounds in results.values() for r in rounds)
    if errors:
        log(f"WARNING: {errors} non-200 responses in the {part} part")
    return errors


@contextlib.contextmanager
def _policy_file(args: argparse.Namespace) -> Iterator[str]:
    """``--policy`` or a temporary copy of :data:`PASSTHROUGH_POLICY`."""
    if args.policy:
        yield str(args.policy)
        return
    with tempfile.TemporaryDirectory(prefix="leangate-bench-") as tmp:
        path = Path(tmp) / "passthrough-policy.yaml"
        path.write_text(PASSTHROUGH_POLICY)
        yield str(path)


# ------------------------------------------------------------- request payloads


def _chat_body(model: str, *, stream: bool, max_tokens: int | None = None) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": VLLM_PROMPT}],
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
    if max_tokens is not None:
        # ignore_eos makes every request generate exactly max_tokens tokens.
        body["max_tokens"] = max_tokens
        body["ignore_eos"] = True
    return json.dumps(body).encode()


def _verify(client: RawHTTPClient, request: bytes, stream: bool, who: str) -> dict[str, Any] | None:
    """One request; fail loudly if it is not a valid OpenAI answer."""
    response = client.send(request, watch_first_token=stream)
    if response.status != 200:
        raise BenchError(f"{who} answered {response.status}: {response.body[:500]!r}")
    if stream:
        if b"data: [DONE]" not in response.body or response.first_token_at is None:
            raise BenchError(f"{who} streamed no tokens / no [DONE]: {response.body[:500]!r}")
        return None
    parsed = json.loads(response.body)
    if not isinstance(parsed, dict) or not parsed.get("choices"):
        raise BenchError(f"{who} returned no choices: {response.body[:500]!r}")
    return parsed


# ------------------------------------------------------------------ responder part


def _c1_phase(
    direct_url: str,
    proxy: SpawnedService,
    body: bytes,
    *,
    stream: bool,
    per_round: int,
    rounds: int,
    counter: _ConnectionCounter | None = None,
) -> dict[str, list[RoundStats]]:
    """Interleaved concurrency-1 rounds, one keep-alive connection per arm."""
    with RawHTTPClient(direct_url) as direct, RawHTTPClient(proxy.url) as via:
        requests = {
            "direct": direct.build_request("POST", CHAT_PATH, body),
            "proxy": via.build_request("POST", CHAT_PATH, body),
        }
        _verify(direct, requests["direct"], stream, "direct backend")
        _verify(via, requests["proxy"], stream, "proxy")

        def one_round(client: RawHTTPClient, request: bytes) -> Callable[[], RoundStats]:
            def run() -> RoundStats:
                start = time.perf_counter()
                sample = sequential_round(client, request, per_round, watch_first_token=stream)
                elapsed = time.perf_counter() - start
                return _stats(sample.latencies, sample.ttfts, sample.errors, elapsed, None)

            return run

        proxy_round = _with_proxy_cpu(proxy, one_round(via, requests["proxy"]))
        if counter is not None:
            proxy_round = counter.counting(proxy_round)
        arms = [("direct", one_round(direct, requests["direct"])), ("proxy", proxy_round)]
        return run_interleaved(arms, rounds=rounds, warmup_rounds=1, on_round=_progress)


def _responder_part(args: argparse.Namespace) -> dict[str, object]:
    rounds = resolve_rounds(args, quick=6, full=12)
    per_round = args.requests_per_round or (1000 if args.quick else 3000)
    stream_per_round = max(20, per_round // 5)
    capacity_total = args.capacity_requests or (2000 if args.quick else 6000)
    with (
        spawn_responder(model=RESPONDER_MODEL, chunk_interval_ms=STREAM_CHUNK_INTERVAL_MS) as resp,
        _policy_file(args) as policy,
        spawn_proxy([resp.url], policy=policy, base_command=args.proxy_command) as proxy,
        contextlib.closing(_ConnectionCounter(resp.url)) as counter,
    ):
        log(f"responder part: non-streaming, c=1, {rounds} rounds x {per_round} requests")
        plain = _c1_phase(
            resp.url,
            proxy,
            _chat_body(RESPONDER_MODEL, stream=False),
            stream=False,
            per_round=per_round,
            rounds=rounds,
            counter=counter,
        )
        log(f"responder part: streaming, c=1, {rounds} rounds x {stream_per_round} requests")
        streamed = _c1_phase(
            resp.url,
            proxy,
            _chat_body(RESPONDER_MODEL, stream=True),
            stream=True,
            per_round=stream_per_round,
            rounds=rounds,
            counter=counter,
        )
        with _spawn_relay(resp.url) as relay:
            log(
                f"responder part: capacity, c={CAPACITY_CONCURRENCY}, "
                f"{rounds} rounds x {capacity_total} requests"
            )
            capacity = _run_async(_capacity_phase(resp.url, relay, proxy, capacity_total, rounds))
    return {
        **_responder_figures(plain, streamed, rounds, per_round, stream_per_round),
        **_capacity_figures(capacity, capacity_total),
    }


def _responder_figures(
    plain: dict[str, list[RoundStats]],
    streamed: dict[str, list[RoundStats]],
    rounds: int,
    per_round: int,
    stream_per_round: int,
) -> dict[str, object]:
    direct, proxy = plain["direct"], plain["proxy"]
    sdirect, sproxy = streamed["direct"], streamed["proxy"]
    plain_cpu, stream_cpu = _cpu_us_per_request(proxy), _cpu_us_per_request(sproxy)
    return {
        "added_p50_ms": rounded(_paired_diff(direct, proxy, "p50_ms")),
        "added_p99_ms": rounded(_paired_diff(direct, proxy, "p99_ms")),
        "added_ttft_p50_ms": rounded(_paired_diff(sdirect, sproxy, "ttft_p50_ms")),
        "proxy_cpu_us_per_request": rounded(plain_cpu, 1),
        "proxy_cpu_us_per_stream_request": rounded(stream_cpu, 1),
        "stream_cpu_us_per_request": rounded(stream_cpu - plain_cpu, 1),
        "backend_connections_per_request": rounded(_connections_per_request(proxy)),
        "backend_connections_per_stream_request": rounded(_connections_per_request(sproxy)),
        "direct_p50_ms": rounded(_median_of(direct, "p50_ms")),
        "proxy_p50_ms": rounded(_median_of(proxy, "p50_ms")),
        "direct_p99_ms": rounded(_median_of(direct, "p99_ms")),
        "proxy_p99_ms": rounded(_median_of(proxy, "p99_ms")),
        "direct_ttft_p50_ms": rounded(_median_of(sdirect, "ttft_p50_ms")),
        "proxy_ttft_p50_ms": rounded(_median_of(sproxy, "ttft_p50_ms")),
        "responder_rounds": rounds,
        "responder_requests_per_round": per_round,
        "responder_stream_requests_per_round": stream_per_round,
        "responder_stream_events": RESPONDER_STREAM_EVENTS,
        "responder_errors": _check_errors(plain, "responder") + _check_errors(streamed, "stream"),
    }


# ------------------------------------------------------------------- capacity part


@contextlib.contextmanager
def _spawn_relay(backend_url: str) -> Iterator[SpawnedService]:
    """The bare uvicorn + aiohttp relay, the floor the proxy's capacity is compared with."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "leangate.bench._relay",
        "serve",
        "--port",
        str(port),
        "--backend-url",
        backend_url,
    ]
    with spawn_service("relay", command, port=port) as relay:
        yield relay


async def _capacity_phase(
    direct_url: str, relay: SpawnedService, proxy: SpawnedService, total: int, rounds: int
) -> dict[str, list[RoundStats]]:
    """Closed-loop rounds at concurrency 64, interleaved: direct, relay, proxy, ...

    The direct arm shows the load generator's own ceiling: far above the relay's, the
    servers under test are what saturates, not the client.
    """
    body = _chat_body(RESPONDER_MODEL, stream=False)
    targets = {"direct": direct_url, "relay": relay.url, "proxy": proxy.url}
    clients = {}
    for name, url in targets.items():
        request = RawHTTPClient(url).build_request("POST", CHAT_PATH, body)
        clients[name] = ClosedLoopClient(url, request, CAPACITY_CONCURRENCY)
        await clients[name].open()

    def arm(name: str) -> Callable[[], Awaitable[RoundStats]]:
        async def run() -> RoundStats:
            start = time.perf_counter()
            sample = await clients[name].run(total)
            elapsed = time.perf_counter() - start
            return _stats(sample.latencies, [], sample.errors, elapsed, None)

        return run

    try:
        arms = [
            ("direct", arm("direct")),
            ("relay", _with_proxy_cpu_async(relay, arm("relay"))),
            ("proxy", _with_proxy_cpu_async(proxy, arm("proxy"))),
        ]
        return await arun_interleaved(arms, rounds=rounds, warmup_rounds=1, on_round=_progress)
    finally:
        for client in clients.values():
            client.close()


def _capacity_figures(capacity: dict[str, list[RoundStats]], total: int) -> dict[str, object]:
    direct, relay, proxy = capacity["direct"], capacity["relay"], capacity["proxy"]
    suffix = f"c{CAPACITY_CONCURRENCY}"
    return {
        f"capacity_ratio_{suffix}": rounded(_paired_ratio(relay, proxy, "throughput")),
        f"capacity_rps_{suffix}_proxy": rounded(_median_of(proxy, "throughput"), 1),
        f"capacity_rps_{suffix}_relay": rounded(_median_of(relay, "throughput"), 1),
        f"capacity_rps_{suffix}_direct": rounded(_median_of(direct, "throughput"), 1),
        f"capacity_p50_ms_{suffix}_proxy": rounded(_median_of(proxy, "p50_ms"), 2),
        f"capacity_p50_ms_{suffix}_relay": rounded(_median_of(relay, "p50_ms"), 2),
        f"capacity_cpu_us_per_request_{suffix}_proxy": rounded(_cpu_us_per_request(proxy), 1),
        f"capacity_cpu_us_per_request_{suffix}_relay": rounded(_cpu_us_per_request(relay), 1),
        "capacity_requests_per_round": total,
        "capacity_errors": _check_errors(capacity, "capacity"),
    }


# ----------------------------------------------------------------------- vLLM part


def _connector(concurrency: int) -> aiohttp.TCPConnector:
    """Keep-alive pool sized to the concurrency: no connection set-up inside rounds."""
    return aiohttp.TCPConnector(limit=concurrency, ttl_dns_cache=None)


async def _concurrent_round(
    session: aiohttp.ClientSession, url: str, body: bytes, total: int, concurrency: int
) -> RoundStats:
    """Closed loop: ``concurrency`` workers issue ``total`` requests back to back."""
    latencies: list[float] = []
    errors = 0
    remaining = total
    headers = {"Content-Type": "application/json"}
    perf = time.perf_counter

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            start = perf()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok = response.status == 200
            if ok:
                latencies.append(perf() - start)
            else:
                errors += 1

    start = perf()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return _stats(latencies, [], errors, perf() - start, None)


def _with_proxy_cpu_async(
    proxy: SpawnedService, fn: Callable[[], Awaitable[RoundStats]]
) -> Callable[[], Coroutine[Any, Any, RoundStats]]:
    async def wrapped() -> RoundStats:
        before = proxy.cpu_seconds()
        stats = await fn()
        return _replace_cpu(stats, proxy.cpu_seconds() - before)

    return wrapped


async def _open_connections(
    session: aiohttp.ClientSession, url: str, concurrency: int
) -> RoundStats:
    """``concurrency`` simultaneous cheap GETs: every keep-alive connection gets opened."""
    latencies: list[float] = []

    async def one() -> None:
        start = time.perf_counter()
        async with session.get(url) as response:
            await response.read()
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return _stats(latencies, [], 0, time.perf_counter() - start, None)


async def _cN_phase(
    direct_url: str,
    proxy: SpawnedService,
    body: bytes,
    *,
    concurrency: int,
    waves: int | None,
    round_seconds: float,
    rounds: int,
) -> dict[str, list[RoundStats]]:
    """Interleaved closed-loop rounds of ``waves * concurrency`` requests.

    Warm-up opens all client connections with cheap ``GET /v1/models`` (a full
    generation wave costs many seconds on a CPU backend).  With ``waves=None`` one
    full wave per arm is also run, to size the rounds to ``round_seconds``.
    """
    async with (
        aiohttp.ClientSession(connector=_connector(concurrency)) as dsession,
        aiohttp.ClientSession(connector=_connector(concurrency)) as psession,
    ):
        sessions = {"direct": (dsession, direct_url), "proxy": (psession, proxy.url)}
        for name, (session, base) in sessions.items():
            _progress(-1, name, await _open_connections(session, base + "/v1/models", concurrency))
        if waves is None:
            warm: dict[str, RoundStats] = {}
            for name, (session, base) in sessions.items():
                warm[name] = await _concurrent_round(
                    session, base + CHAT_PATH, body, concurrency, concurrency
                )
                _progress(-1, name, warm[name])
            waves = max(2, round(round_seconds / max(warm["direct"].elapsed_s, 1e-3)))
        total = waves * concurrency
        log(f"  c={concurrency}: {rounds} rounds x {total} requests ({waves} waves)")

        def arm(name: str) -> Callable[[], Awaitable[RoundStats]]:
            session, base = sessions[name]
            return lambda: _concurrent_round(session, base + CHAT_PATH, body, total, concurrency)

        arms: list[tuple[str, Callable[[], Awaitable[RoundStats]]]] = [
            ("direct", arm("direct")),
            ("proxy", _with_proxy_cpu_async(proxy, arm("proxy"))),
        ]
        return await arun_interleaved(arms, rounds=rounds, warmup_rounds=0, on_round=_progress)


def _c1_vllm_phase(
    direct_url: str, proxy: SpawnedService, body: bytes, *, round_seconds: float, rounds: int
) -> dict[str, list[RoundStats]]:
    """Concurrency-1 rounds sized from a short calibration run."""
    with RawHTTPClient(direct_url) as probe:
        request = probe.build_request("POST", CHAT_PATH, body)
        start = time.perf_counter()
        for _ in range(3):
            probe.send(request)
        per_request = (time.perf_counter() - start) / 3
    per_round = max(3, min(500, round(round_seconds / max(per_request, 1e-4))))
    log(f"  c=1: {rounds} rounds x {per_round} requests (~{per_request * 1e3:.0f} ms each)")
    return _c1_phase(direct_url, proxy, body, stream=False, per_round=per_round, rounds=rounds)


def _discover_model(base_url: str) -> str:
    with RawHTTPClient(base_url) as client:
        response = client.send(client.build_request("GET", "/v1/models"))
    if response.status != 200:
        raise BenchError(f"GET {base_url}/v1/models answered {response.status}")
    data = json.loads(response.body).get("data") or []
    if not data:
        raise BenchError(f"{base_url}/v1/models lists no model")
    return str(data[0]["id"])


def _completion_tokens(base_url: str, body: bytes) -> int | None:
    with RawHTTPClient(base_url) as client:
        parsed = _verify(client, client.build_request("POST", CHAT_PATH, body), False, base_url)
    usage = (parsed or {}).get("usage") or {}
    tokens = usage.get("completion_tokens")
    return int(tokens) if tokens is not None else None


def _vllm_part(args: argparse.Namespace) -> dict[str, object]:
    rounds = resolve_rounds(args, quick=3, full=7)
    round_seconds = args.round_seconds or (2.0 if args.quick else 10.0)
    with backend_urls(args) as urls:
        backend = urls[0]
        wait_for_http(backend, "/v1/models", timeout_s=120.0)
        model = args.model or _discover_model(backend)
        body = _chat_body(model, stream=False, max_tokens=args.max_tokens)
        log(f"vllm part: backend {backend}, model {model}, max_tokens {args.max_tokens}")
        with (
            _policy_file(args) as policy,
            spawn_proxy([backend], policy=policy, base_command=args.proxy_command) as proxy,
        ):
            tokens = {
                "direct": _completion_tokens(backend, body),
                "proxy": _completion_tokens(proxy.url, body),
            }
            log(f"vllm part: c=1 (completion tokens {tokens})")
            c1 = _c1_vllm_phase(backend, proxy, body, round_seconds=round_seconds, rounds=rounds)
            log(f"vllm part: c={args.concurrency}")
            cn = _run_async(
                _cN_phase(
                    backend,
                    proxy,
                    body,
                    concurrency=args.concurrency,
                    waves=args.waves or (1 if args.quick else None),
                    round_seconds=round_seconds,
                    rounds=rounds,
                )
            )
    return _vllm_figures(c1, cn, rounds, model, args, tokens)


def _vllm_figures(
    c1: dict[str, list[RoundStats]],
    cn: dict[str, list[RoundStats]],
    rounds: int,
    model: str,
    args: argparse.Namespace,
    tokens: dict[str, int | None],
) -> dict[str, object]:
    def figures(phase: dict[str, list[RoundStats]], suffix: str) -> dict[str, object]:
        direct, proxy = phase["direct"], phase["proxy"]
        return {
            f"throughput_ratio_{suffix}": rounded(_paired_ratio(direct, proxy, "throughput")),
            f"latency_ratio_{suffix}": rounded(_paired_ratio(direct, proxy, "p50_ms")),
            f"direct_rps_{suffix}": rounded(_median_of(direct, "throughput"), 2),
            f"proxy_rps_{suffix}": rounded(_median_of(proxy, "throughput"), 2),
            f"direct_p50_ms_{suffix}": rounded(_median_of(direct, "p50_ms"), 2),
            f"proxy_p50_ms_{suffix}": rounded(_median_of(proxy, "p50_ms"), 2),
            f"proxy_cpu_us_per_request_vllm_{suffix}": rounded(_cpu_us_per_request(proxy), 1),
        }

    return {
        **figures(c1, "c1"),
        **figures(cn, f"c{args.concurrency}"),
        "by_concurrency": [
            _concurrency_point(c1, 1),
            _concurrency_point(cn, args.concurrency),
        ],
        "vllm_rounds": rounds,
        "vllm_model": model,
        "vllm_max_tokens": args.max_tokens,
        "vllm_completion_tokens": tokens,
        "vllm_requests_per_round_c1": c1["direct"][0].requests if c1["direct"] else 0,
        f"vllm_requests_per_round_c{args.concurrency}": (
            cn["direct"][0].requests if cn["direct"] else 0
        ),
        "vllm_errors": _check_errors(c1, "vllm c1") + _check_errors(cn, "vllm cN"),
    }


def _concurrency_point(phase: dict[str, list[RoundStats]], concurrency: int) -> dict[str, object]:
    """One concurrency's figures as a row, so that a report can plot the proxy's overhead
    against concurrency without knowing the ``_c1``/``_c64`` key suffixes."""
    direct, proxy = phase["direct"], phase["proxy"]
    return {
        "concurrency": concurrency,
        "latency_ratio": rounded(_paired_ratio(direct, proxy, "p50_ms")),
        "throughput_ratio": rounded(_paired_ratio(direct, proxy, "throughput")),
        "direct_p50_ms": rounded(_median_of(direct, "p50_ms"), 2),
        "proxy_p50_ms": rounded(_median_of(proxy, "p50_ms"), 2),
        "direct_rps": rounded(_median_of(direct, "throughput"), 2),
        "proxy_rps": rounded(_median_of(proxy, "throughput"), 2),
    }


# ------------------------------------------------------------------------- driver


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run with uvloop when available: a cheaper event loop for the load generator."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.run(coro)
    return uvloop.run(coro)


_PLACEHOLDERS: dict[str, object] = {
    key: None
    for key in (
        "added_p50_ms",
        "added_p99_ms",
        "added_ttft_p50_ms",
        "proxy_cpu_us_per_request",
        "stream_cpu_us_per_request",
        "capacity_ratio_c64",
        "direct_p50_ms",
        "proxy_p50_ms",
        "throughput_ratio_c64",
        "latency_ratio_c64",
        "throughput_ratio_c1",
        "latency_ratio_c1",
    )
}


def _parts(args: argparse.Namespace) -> list[str]:
    parts = [p.strip() for p in str(args.parts).split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise BenchError(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    return parts


def _looks_short_circuited(result: dict[str, object]) -> bool:
    """True if the proxy beat the backend it forwards to: it did not really forward
    (e.g. a cache answered), so the figures do not measure the passthrough path."""
    added = result.get("added_p50_ms")
    latency_c1 = result.get("latency_ratio_c1")
    suspect = (isinstance(added, float) and added < 0) or (
        isinstance(latency_c1, float) and latency_c1 < 0.8
    )
    if suspect:
        log("WARNING: the proxy answered faster than the backend: is a cache stage active?")
    return suspect


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run the benchmark; returns the figures (``emit`` prints them)."""
    parts = _parts(args)
    started = time.monotonic()
    result: dict[str, object] = {"benchmark": "passthrough", **_PLACEHOLDERS}
    if "responder" in parts:
        result.update(_responder_part(args))
    if "vllm" in parts:
        result.update(_vllm_part(args))
    result.update(
        {
            "targets": {
                "added_p50_ms_max": 0.75,
                "proxy_cpu_us_per_request_max": 300,
                "stream_cpu_us_per_request_max": 100,
                "capacity_ratio_c64_min": 0.9,
                "throughput_ratio_min": 0.97,
                "latency_ratio_max": 1.02,
            },
            "suspect_short_circuit": _looks_short_circuited(result),
            "policy": args.policy or "built-in passthrough (no stage)",
            "parts": parts,
            "quick": bool(args.quick),
            "seed": args.seed,
            "duration_s": round(time.monotonic() - started, 1),
            "machine": machine_info(),
        }
    )
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m leangate.bench.passthrough`` (same as ``leangate bench passthrough``)."""
    parser = argparse.ArgumentParser(prog="leangate bench passthrough", description=__doc__)
    add_arguments(parser)
    emit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
