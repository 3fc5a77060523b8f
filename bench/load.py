"""``leangate bench load``: the proxy under load and over time, with its default policy.

Every process is the benchmark's own: fast OpenAI-compatible responders
(``bench/responder.py``) as the backends, and proxies run as ``leangate serve``
subprocesses without ``--policy`` (the default policy: the exact result cache for
everything) sharing one Redis database, so that their ``/proc/<pid>`` can be read.
Two topologies:

* *single*: one responder, one proxy;
* *replicated*: two responders, two proxies, each proxy given both responders through
  ``LEANGATE_BACKEND_URL`` (comma-separated), the load spread over both proxies.

Parts (``--parts``):

1. *load*: ``--requests`` (20,000) at concurrency ``--concurrency`` (256) in a closed
   loop, on each topology. Half the requests stream (read to ``data: [DONE]`` and the end
   of the chunked body, every event parsed, the text checked); half the prompts come from
   a pool of ``--hot-prompts`` repeated ones, the rest are unique, so the cache both hits
   and misses. Reported: errors (any non-200, broken stream, wrong body or timeout),
   p50/p99 latency of streamed and plain requests separately, throughput, hit ratio (from
   the proxies' ``x-leangate-cache`` headers), the proxies' CPU time per request and RSS.
2. *soak*: a fixed request rate (``--soak-rps``) for ``--soak-s`` seconds (open loop: a
   request is sent at its time whatever the others do; its latency counts from that
   time), the same mix. Reported: the proxies' RSS after the warm-up (the first tenth of
   the soak, 5 to 60 s) and at the end (growth must stay within 10 %), and their open file
   descriptors and sockets before the load (once each proxy has answered a few requests, so
   that what it opens on first use and keeps is in the baseline), at its peak, and after it
   stopped: the client connections are closed and the proxies are given ``--settle-s``
   (75 s) to close their idle connections (backends: a 4 s keep-alive; Redis: 30 s idle),
   after which they must be back at the baseline. Sockets are told apart (clients, backends,
   Redis, listening, other) from ``/proc/net/tcp``; ``soak_fds_excess`` is what was left.

``--soak`` is the soak mode (``--parts soak``, 600 s unless ``--soak-s`` says otherwise);
``--quick`` runs both parts with 3,000 requests and a 30 s soak. The Redis database
(``--redis-db``, default 14, on the host of ``--redis-url`` or 127.0.0.1:6379) must be
empty or left by an earlier run of this benchmark; it is emptied at the end. Each phase
has a hard time limit; a phase that overruns counts its unfinished requests as errors.
"""

from __future__ import annotations

import _thread
import argparse
import asyncio
import collections
import contextlib
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import orjson

from .common import (
    BenchError,
    SpawnedService,
    add_common_arguments,
    free_port,
    log,
    machine_info,
    metric_total,
    percentile,
    proxy_command,
    ratio,
    rounded,
    spawn_responder,
    spawn_service,
)
from .responder import ResponderConfig

T = TypeVar("T")

PARTS = ("load", "soak")
TOPOLOGIES = ("single", "replicated")
MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
EXPECTED_TEXT = ResponderConfig().completion_text
DEFAULT_REDIS = "redis://127.0.0.1:6379"
MARKER_KEY = "leangate-bench-load:owner"
"""Set in the benchmark's Redis database while a run uses it (value: the run's pid)."""
MAX_RSS_GROWTH = 0.10
KINDS = ("stream", "plain")
HIT_OUTCOMES = frozenset({"hit-exact", "hit-semantic"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leangate bench load``."""
    add_common_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=None, help="unused (no data needed)")
    parser.add_argument(
        "--parts", default=None, help="comma-separated: load, soak (default: load; quick: both)"
    )
    parser.add_argument(
        "--soak", action="store_true", help="the soak mode: --parts soak, 600 s by default"
    )
    parser.add_argument(
        "--soak-s", type=float, default=None, help="soak duration (default 600; quick 30)"
    )
    parser.add_argument("--soak-rps", type=float, default=300.0, help="soak request rate")
    parser.add_argument(
        "--soak-topology", choices=TOPOLOGIES, default="single", help="topology of the soak"
    )
    parser.add_argument(
        "--topologies",
        default=",".join(TOPOLOGIES),
        help="load part: comma-separated subset of single, replicated (default both)",
    )
    parser.add_argument(
        "--requests", type=int, default=None, help="load part: per topology (20000; quick 3000)"
    )
    parser.add_argument("--concurrency", type=int, default=256, help="load part: connections")
    parser.add_argument("--stream-fraction", type=float, default=0.5)
    parser.add_argument(
        "--repeat-fraction",
        type=float,
        default=0.5,
        help="share of requests whose prompt comes from the pool of repeated prompts",
    )
    parser.add_argument("--hot-prompts", type=int, default=500, help="repeated prompts' pool")
    parser.add_argument("--redis-db", type=int, default=14, help="a Redis database of its own")
    parser.add_argument(
        "--request-timeout-s", type=float, default=30.0, help="one request's time limit"
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=75.0,
        help="soak: how long the proxies may take to close idle connections after the load",
    )


# ------------------------------------------------------------------------ HTTP client


class AnswerError(Exception):
    """A request that did not get a complete, well-formed HTTP answer."""


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class _ResponseParser:
    """An HTTP/1.1 response read incrementally: ``content-length`` or chunked bodies."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._body = bytearray()
        self._state = "head"
        self._remaining = 0
        self.status = 0
        self.headers: dict[bytes, bytes] = {}

    @property
    def started(self) -> bool:
        return self._state != "head" or bool(self._buf)

    def response(self) -> Response:
        return Response(self.status, self.headers, bytes(self._body))

    def feed(self, data: bytes) -> bool:
        """Take ``data``; True once the response is complete. Raises AnswerError."""
        if self._state == "done":
            raise AnswerError("bytes after the end of an answer")
        self._buf += data
        if self._state == "head" and not self._head():
            return False
        if self._state == "body":
            take = min(self._remaining, len(self._buf))
            self._body += self._buf[:take]
            del self._buf[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._state = "done"
        while self._state in ("size", "data", "trailer") and self._chunked_step():
            pass
        if self._state == "done" and self._buf:
            raise AnswerError("bytes after the end of an answer")
        return self._state == "done"

    def _head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > 65536:
                raise AnswerError("response head too large")
            return False
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        try:
            self.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise AnswerError(f"bad status line {lines[0][:80]!r}") from None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()
        if b"chunked" in self.headers.get(b"transfer-encoding", b"").lower():
            self._state = "size"
        elif b"content-length" in self.headers:
            self._remaining = int(self.headers[b"content-length"])
            self._state = "body" if self._remaining else "done"
        else:
            raise AnswerError("response with neither content-length nor chunked body")
        return True

    def _chunked_step(self) -> bool:
        """One step of a chunked body; False when more bytes are needed."""
        buf = self._buf
        if self._state == "size":
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            try:
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
            except ValueError:
                raise AnswerError("bad chunk size") from None
            del buf[: end + 2]
            self._remaining = size
            self._state = "data" if size else "trailer"
            return True
        if self._state == "data":
            if len(buf) < self._remaining + 2:
                return False
            if buf[self._remaining : self._remaining + 2] != b"\r\n":
                raise AnswerError("chunk not followed by CRLF")
            self._body += buf[: self._remaining]
            del buf[: self._remaining + 2]
            self._state = "size"
            return True
        end = buf.find(b"\r\n")  # trailer lines, then an empty line
        if end < 0:
            return False
        empty = end == 0
        del buf[: end + 2]
        if empty:
            self._state = "done"
        return True


class _Connection(asyncio.Protocol):
    """One keep-alive client connection; one request at a time."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = _ResponseParser()
        self._answer: asyncio.Future[Response] | None = None
        self.idle_since = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement, but do not subclass, asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        answer = self._answer
        if answer is not None and not answer.done():
            where = "inside" if self._parser.started else "before"
            answer.set_exception(AnswerError(f"connection closed {where} an answer"))

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or answer.done():
            self.close()  # bytes nobody asked for
            return
        try:
            if self._parser.feed(data):
                answer.set_result(self._parser.response())
        except AnswerError as exc:
            answer.set_exception(exc)
            self.close()

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, request: bytes) -> asyncio.Future[Response]:
        if self._transport is None:
            raise AnswerError("connection closed before the request")
        self._parser = _ResponseParser()
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return self._answer

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _connect(host: str, port: int) -> _Connection:
    _, connection = await asyncio.get_running_loop().create_connection(_Connection, host, port)
    return connection


# ------------------------------------------------------------------------- the mix


@dataclass(frozen=True, slots=True)
class LoadRequest:
    data: bytes
    stream: bool
    repeated: bool
    prompt: int = -1
    """The repeated prompt's number (-1: a unique prompt)."""


class Mix:
    """The requests, drawn from a seeded generator: streamed or not, and a repeated prompt
    (one of ``hot_prompts``) or a unique one. ``run_id`` keeps runs from sharing entries."""

    def __init__(
        self,
        *,
        seed: int,
        run_id: str,
        stream_fraction: float,
        repeat_fraction: float,
        hot_prompts: int,
    ) -> None:
        self._rng = random.Random(seed)
        self._run_id = run_id
        self._stream_fraction = stream_fraction
        self._repeat_fraction = repeat_fraction
        self._hot = max(1, hot_prompts)
        self._count = 0

    def __next__(self) -> LoadRequest:
        rng, i = self._rng, self._count
        self._count += 1
        stream = rng.random() < self._stream_fraction
        repeated = rng.random() < self._repeat_fraction
        k = rng.randrange(self._hot) if repeated else -1
        if repeated:
            prompt = f"Load test {self._run_id}, question {k}: what is {k} times seven?"
        else:
            prompt = f"Load test {self._run_id}, request {i}: say hello."
        body: dict[str, object] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 16,
        }
        if stream:
            body["stream"] = True
        return LoadRequest(_http_request(orjson.dumps(body)), stream, repeated, k)

    def take(self, count: int) -> list[LoadRequest]:
        return [next(self) for _ in range(count)]


def _http_request(body: bytes) -> bytes:
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def check_answer(response: Response, stream: bool) -> str | None:
    """Why the answer is wrong, or None: a 200 with the responder's text, and a stream
    of well-formed events ending with ``data: [DONE]``."""
    if response.status != 200:
        return f"status {response.status}"
    try:
        if not stream:
            content = orjson.loads(response.body)["choices"][0]["message"]["content"]
            return None if content == EXPECTED_TEXT else "plain: wrong text"
        if not response.headers.get(b"content-type", b"").startswith(b"text/event-stream"):
            return "stream: not text/event-stream"
        events = [e for e in response.body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
        data = [
            b"\n".join(
                line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
            )
            for event in events
        ]
        if not data or data[-1] != b"[DONE]":
            return "stream: no data: [DONE] at the end"
        text = []
        for payload in data[:-1]:
            if payload == b"[DONE]":
                return "stream: data: [DONE] before the end"
            for choice in orjson.loads(payload).get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
        return None if "".join(text) == EXPECTED_TEXT else "stream: wrong text"
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return f"{'stream' if stream else 'plain'}: malformed body"


# --------------------------------------------------------------------------- tallies


@dataclass
class Tally:
    """What a phase's requests got."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    cache: collections.Counter[str] = field(default_factory=collections.Counter)
    sent: int = 0
    elapsed_s: float = 0.0
    timed_out: bool = False

    @property
    def ok(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def record(self, request: LoadRequest, response: Response, seconds: float) -> None:
        problem = check_answer(response, request.stream)
        if problem is not None:
            self.errors[problem] += 1
            return
        self.latencies["stream" if request.stream else "plain"].append(seconds)
        outcome = response.headers.get(b"x-leangate-cache", b"none").decode(errors="replace")
        self.cache[outcome] += 1

    def figures(self, prefix: str) -> dict[str, object]:
        hits = sum(n for outcome, n in self.cache.items() if outcome in HIT_OUTCOMES)
        out: dict[str, object] = {
            f"{prefix}requests": self.sent,
            f"{prefix}ok": self.ok,
            f"{prefix}errors": self.error_count,
            f"{prefix}error_kinds": dict(self.errors.most_common(10)),
            f"{prefix}timed_out": self.timed_out,
            f"{prefix}elapsed_s": rounded(self.elapsed_s, 2),
            f"{prefix}throughput_rps": rounded(
                ratio(self.ok + self.error_count, self.elapsed_s), 1
            ),
            f"{prefix}hit_ratio": rounded(ratio(hits, self.ok), 4),
            f"{prefix}cache_outcomes": dict(self.cache),
        }
        for kind in KINDS:
            values = self.latencies[kind]
            out[f"{prefix}{kind}_requests"] = len(values)
            out[f"{prefix}{kind}_p50_ms"] = rounded(percentile(values, 50) * 1e3, 3)
            out[f"{prefix}{kind}_p99_ms"] = rounded(percentile(values, 99) * 1e3, 3)
        return out


async def _exchange(connection: _Connection, request: LoadRequest) -> Response:
    response = await connection.send(request.data)
    connection.idle_since = time.monotonic()
    if response.headers.get(b"connection", b"").lower() == b"close":
        connection.close()
    return response


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, AnswerError):
        return str(exc)
    return f"connection: {type(exc).__name__}"


# ----------------------------------------------------------------- closed loop (load)


async def closed_loop(
    targets: Sequence[tuple[str, int]],
    requests: Sequence[LoadRequest],
    *,
    concurrency: int,
    request_timeout_s: float,
    phase_timeout_s: float,
) -> Tally:
    """``concurrency`` connections spread over ``targets``, each sending its next request
    as soon as the last one is answered, until ``requests`` are all sent."""
    tally = Tally()
    pending = iter(requests)

    async def worker(host: str, port: int) -> None:
        connection: _Connection | None = None
        try:
            for request in pending:
                tally.sent += 1
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(request_timeout_s):
                        if connection is None or not connection.is_open:
                            connection = await _connect(host, port)
                        response = await _exchange(connection, request)
                except (TimeoutError, OSError, AnswerError) as exc:
                    tally.errors[_error_kind(exc)] += 1
                    if connection is not None:
                        connection.close()
                    connection = None
                    continue
                tally.record(request, response, time.perf_counter() - started)
        finally:
            if connection is not None:
                connection.close()

    started = time.perf_counter()
    tasks = [
        asyncio.create_task(worker(*targets[i % len(targets)]))
        for i in range(min(concurrency, len(requests)))
    ]
    if tasks:
        _, unfinished = await asyncio.wait(tasks, timeout=phase_timeout_s)
        if unfinished:
            tally.timed_out = True
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
    tally.elapsed_s = time.perf_counter() - started
    missing = len(requests) - tally.ok - tally.error_count
    if missing:
        tally.errors["unfinished at the phase's time limit"] += missing
        tally.sent = len(requests)
    return tally


# ------------------------------------------------------------------ open loop (soak)


class _Pool:
    """Keep-alive connections to one proxy for the open loop, reused most recent first;
    one idle for 2 s is closed (uvicorn closes them after 5 s, which could race a send)."""

    MAX_IDLE_S = 2.0

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)

    async def acquire(self) -> _Connection:
        await self._slots.acquire()
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.is_open and now - connection.idle_since < self.MAX_IDLE_S:
                return connection
            connection.close()
        try:
            return await _connect(self.host, self.port)
        except BaseException:
            self._slots.release()
            raise

    def release(self, connection: _Connection | None) -> None:
        if connection is not None and connection.is_open:
            self._idle.append(connection)
        self._slots.release()

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


async def open_loop(
    targets: Sequence[tuple[str, int]],
    mix: Mix,
    *,
    rate: float,
    duration_s: float,
    request_timeout_s: float,
    max_connections: int = 256,
    grace_s: float = 60.0,
) -> Tally:
    """``rate`` requests a second for ``duration_s``, round-robin over ``targets``; each
    request's latency counts from the time it was due."""
    tally = Tally()
    pools = [_Pool(host, port, max(1, max_connections // len(targets))) for host, port in targets]
    inflight: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # uvloop's loop.time() moves in whole milliseconds

    async def one(pool: _Pool, request: LoadRequest, due: float) -> None:
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(request_timeout_s):
                connection = await pool.acquire()
                response = await _exchange(connection, request)
        except (TimeoutError, OSError, AnswerError) as exc:
            tally.errors[_error_kind(exc)] += 1
            if connection is not None:
                connection.close()
            return
        finally:
            if connection is not None:
                pool.release(connection)
        tally.record(request, response, clock() - due)

    start = clock()
    try:
        while (elapsed := clock() - start) < duration_s:
            due_count = min(int(elapsed * rate) + 1, math.ceil(duration_s * rate))
            while tally.sent < due_count:
                pool = pools[tally.sent % len(pools)]
                task = loop.create_task(one(pool, next(mix), start + tally.sent / rate))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                tally.sent += 1
            await asyncio.sleep(min(0.005, max(0.0, start + tally.sent / rate - clock())))
        if inflight:
            _, unfinished = await asyncio.wait(set(inflight), timeout=grace_s)
            if unfinished:
                tally.timed_out = True
                for task in unfinished:
                    task.cancel()
                await asyncio.gather(*unfinished, return_exceptions=True)
    finally:
        for pool in pools:
            pool.close()
    tally.elapsed_s = clock() - start
    missing = tally.sent - tally.ok - tally.error_count
    if missing:
        tally.errors["unfinished at the phase's time limit"] += missing
    return tally


# ------------------------------------------------------------------ process probes


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def _tcp_table() -> dict[int, tuple[int, int, str]]:
    """Socket inode -> (local port, remote port, state) from ``/proc/net/tcp{,6}``."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
                table[inode] = (
                    int(local.rsplit(":", 1)[1], 16),
                    int(remote.rsplit(":", 1)[1], 16),
                    state,
                )
    return table


def fd_census(
    pid: int, *, own_port: int, backend_ports: set[int], redis_port: int
) -> dict[str, int]:
    """Open file descriptors of ``pid``, its sockets, and the TCP sockets by peer."""
    census = collections.Counter({"fds": 0, "sockets": 0})
    inodes: list[int] = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        census["fds"] += 1
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                census["sockets"] += 1
                inodes.append(int(target[8:-1]))
    table = _tcp_table()
    for inode in inodes:
        entry = table.get(inode)
        if entry is None:
            census["sockets_other"] += 1
            continue
        local, remote, state = entry
        if state == "0A":
            census["sockets_listening"] += 1
        elif local == own_port:
            census["sockets_clients"] += 1
        elif remote == redis_port:
            census["sockets_redis"] += 1
        elif remote in backend_ports:
            census["sockets_backends"] += 1
        else:
            census["sockets_other"] += 1
    for key in ("sockets_listening", "sockets_clients", "sockets_backends", "sockets_redis"):
        census.setdefault(key, 0)
    census.setdefault("sockets_other", 0)
    return dict(census)


# ------------------------------------------------------------------ processes, Redis


@dataclass
class Topology:
    name: str
    proxies: list[SpawnedService]
    backend_urls: list[str]
    redis_port: int

    @property
    def targets(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", proxy.port) for proxy in self.proxies]

    def census(self) -> list[dict[str, int]]:
        ports = {urlsplit(url).port or 80 for url in self.backend_urls}
        return [
            fd_census(p.pid, own_port=p.port, backend_ports=ports, redis_port=self.redis_port)
            for p in self.proxies
        ]

    def rss(self) -> list[int]:
        return [rss_kb(proxy.pid) for proxy in self.proxies]

    def cpu_seconds(self) -> float:
        return sum(proxy.cpu_seconds() for proxy in self.proxies)

    def metrics(self) -> dict[str, float]:
        """Totals over the proxies of the counters that tell failures apart."""
        names = {
            "stage_failed_open": "leangate_stage_failed_open_total",
            "stream_errors": "leangate_stream_errors_total",
            "cache_errors": "leangate_cache_errors_total",
            "backend_requests": "leangate_backend_requests_total",
        }
        totals = dict.fromkeys(names, 0.0)
        for proxy in self.proxies:
            try:
                for key, name in names.items():
                    totals[key] += metric_total(proxy.url, name)
            except Exception as exc:  # figures for context only: never fail the run
                log(f"cannot read {proxy.url}/metrics: {exc}")
        return totals

    def log_problems(self) -> list[str]:
        """The proxies' logged errors and tracebacks (their last few)."""
        lines = []
        for proxy in self.proxies:
            with contextlib.suppress(OSError):
                text = proxy.log_path.read_text(errors="replace")
                lines += [
                    f"{proxy.name}: {line[:300]}"
                    for line in text.splitlines()
                    if "ERROR" in line or "Traceback" in line or "Error:" in line
                ]
        return lines[-10:]


@contextlib.contextmanager
def topology(
    name: str, args: argparse.Namespace, redis_url: str, given_backends: Sequence[str]
) -> Iterator[Topology]:
    """Start the responders (unless ``given_backends``) and proxies of ``name``."""
    replicas = 2 if name == "replicated" else 1
    with ExitStack() as stack:
        backends = list(given_backends)
        if not backends:
            backends = [
                stack.enter_context(spawn_responder(model=MODEL)).url for _ in range(replicas)
            ]
        proxies = []
        for i in range(replicas):
            port = free_port()
            cmd = proxy_command([], port=port, redis_url=redis_url, base_command=args.proxy_command)
            service = stack.enter_context(
                spawn_service(
                    f"proxy-{i + 1}",
                    cmd,
                    port=port,
                    # A backend given by the caller may be down on purpose: then only
                    # wait for the proxy itself.
                    health_path="/metrics" if given_backends else "/health",
                    startup_timeout_s=90.0,
                    env={"LEANGATE_BACKEND_URL": ",".join(backends)},
                )
            )
            proxies.append(service)
        yield Topology(name, proxies, backends, urlsplit(redis_url).port or 6379)


def _with_db(url: str | None, db: int) -> str:
    parts = urlsplit(url or DEFAULT_REDIS)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def redis_database(url: str) -> Iterator[dict[str, int]]:
    """Own the Redis database of ``url`` for the run, and empty it afterwards.

    It must be empty, or hold the marker of an earlier run of this benchmark whose
    process is gone (its keys are then removed first). Yields a dict that gets
    ``redis_keys_deleted`` at the end.
    """
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=30)
    report: dict[str, int] = {}
    try:
        try:
            client.ping()
        except redis.RedisError as exc:
            raise BenchError(f"Redis at {url} does not answer: {exc}") from exc
        size = int(client.dbsize())
        if size:
            owner = client.get(MARKER_KEY)
            if owner is None or _pid_alive(int(owner)):
                raise BenchError(
                    f"Redis database {url} holds {size} keys this benchmark did not leave "
                    "(or a run in progress owns it); pick another --redis-db"
                )
            log(f"removing {size} keys left in {url} by an interrupted run (pid {int(owner)})")
            client.flushdb()
        client.set(MARKER_KEY, str(os.getpid()))
        yield report
    finally:
        with contextlib.suppress(redis.RedisError):
            if client.get(MARKER_KEY) == str(os.getpid()).encode():
                report["redis_keys_deleted"] = int(client.dbsize()) - 1
                client.flushdb()
        client.close()


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Interrupt the main thread after ``seconds`` (a last resort: every phase has its own
    limit); the services' context managers then stop them."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        log(f"hard time limit of {seconds:.0f} s reached: interrupting")
        _thread.interrupt_main()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except KeyboardInterrupt:
        if fired.is_set():
            raise BenchError(f"the benchmark overran its hard limit of {seconds:.0f} s") from None
        raise
    finally:
        timer.cancel()


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.run(coro)
    return uvloop.run(coro)


# ----------------------------------------------------------------------------- parts


def _load_phase(
    topo: Topology, args: argparse.Namespace, mix: Mix, requests: int
) -> dict[str, object]:
    prefix = f"{topo.name}_"
    batch = mix.take(requests)
    phase_timeout = 60.0 + requests * 0.02
    rss_before = topo.rss()
    census_before = _sum_census(topo.census())
    cpu_before = topo.cpu_seconds()
    log(
        f"load/{topo.name}: {requests} requests at concurrency {args.concurrency} over "
        f"{len(topo.proxies)} proxies (limit {phase_timeout:.0f} s)"
    )
    tally = _run_async(
        closed_loop(
            topo.targets,
            batch,
            concurrency=args.concurrency,
            request_timeout_s=args.request_timeout_s,
            phase_timeout_s=phase_timeout,
        )
    )
    cpu = topo.cpu_seconds() - cpu_before
    metrics = topo.metrics()
    repeats = [r.prompt for r in batch if r.repeated]
    result = tally.figures(prefix)
    result.update(
        {
            # Every repeat of a prompt after its first could be a hit (or coalesced).
            f"{prefix}hit_ratio_ceiling": rounded(
                ratio(len(repeats) - len(set(repeats)), len(batch)), 4
            ),
            f"{prefix}proxies": len(topo.proxies),
            f"{prefix}backends": len(topo.backend_urls),
            f"{prefix}proxy_cpu_us_per_request": rounded(ratio(cpu, tally.sent) * 1e6, 1),
            f"{prefix}proxy_rss_mib_before": [round(kb / 1024, 1) for kb in rss_before],
            f"{prefix}proxy_rss_mib_after": [round(kb / 1024, 1) for kb in topo.rss()],
            f"{prefix}proxy_fds_before": census_before,
            f"{prefix}proxy_fds_after": _sum_census(topo.census()),
            f"{prefix}proxy_metrics": metrics,
            f"{prefix}proxy_log_problems": topo.log_problems(),
        }
    )
    _log_figures(prefix, result)
    if metrics["cache_errors"]:
        log(
            f"  WARNING: {metrics['cache_errors']:.0f} cache store errors (requests went on "
            f"without the cache): hit ratio {result[prefix + 'hit_ratio']} of at most "
            f"{result[prefix + 'hit_ratio_ceiling']}"
        )
    return result


def _log_figures(prefix: str, result: dict[str, object]) -> None:
    log(
        f"  {prefix[:-1]}: ok={result[prefix + 'ok']} errors={result[prefix + 'errors']} "
        f"rps={result[prefix + 'throughput_rps']} hit_ratio={result[prefix + 'hit_ratio']} "
        f"stream p50/p99={result[prefix + 'stream_p50_ms']}/{result[prefix + 'stream_p99_ms']} ms "
        f"plain p50/p99={result[prefix + 'plain_p50_ms']}/{result[prefix + 'plain_p99_ms']} ms"
    )
    if result[prefix + "errors"]:
        log(f"  errors: {result[prefix + 'error_kinds']}")


def _sum_census(census: list[dict[str, int]]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for one in census:
        total.update(one)
    return dict(total)


async def _soak_async(
    topo: Topology, args: argparse.Namespace, mix: Mix, duration: float, warmup: float
) -> tuple[Tally, dict[str, object]]:
    """The open loop, with the proxies' memory and descriptors sampled every second."""
    samples: list[tuple[float, list[int], dict[str, int]]] = []
    started = time.monotonic()

    async def sample() -> None:
        while True:
            samples.append((time.monotonic() - started, topo.rss(), _sum_census(topo.census())))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    try:
        tally = await open_loop(
            topo.targets,
            mix,
            rate=args.soak_rps,
            duration_s=duration,
            request_timeout_s=args.request_timeout_s,
        )
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    end_rss = topo.rss()
    warm = next((s for s in samples if s[0] >= warmup), samples[-1] if samples else None)
    warm_rss = warm[1] if warm else end_rss
    series_step = max(1, len(samples) // 20)
    extra: dict[str, object] = {
        "rss_warm": warm_rss,
        "rss_end": end_rss,
        "rss_max": [max(s[1][i] for s in samples) for i in range(len(topo.proxies))]
        if samples
        else end_rss,
        "series": [
            [round(s[0]), [round(kb / 1024, 1) for kb in s[1]]] for s in samples[::series_step]
        ],
        "peak_census": {
            key: max(s[2].get(key, 0) for s in samples)
            for key in (samples[0][2] if samples else {})
        },
    }
    return tally, extra


def _settle(
    topo: Topology, baseline: dict[str, int], limit_s: float
) -> tuple[dict[str, int], float]:
    """Wait (up to ``limit_s``) until the proxies hold no more descriptors and sockets than
    at ``baseline``; the last census and how long it took."""
    started = time.monotonic()
    while True:
        now = _sum_census(topo.census())
        if now["fds"] <= baseline["fds"] and now["sockets"] <= baseline["sockets"]:
            return now, time.monotonic() - started
        if time.monotonic() - started >= limit_s:
            return now, time.monotonic() - started
        time.sleep(0.5)


def _soak_phase(
    topo: Topology, args: argparse.Namespace, mix: Mix, duration: float
) -> dict[str, object]:
    prefix = "soak_"
    warmup = min(60.0, max(5.0, duration / 10))
    # The baseline is the proxies' idle state once they have served a request or two
    # (connections a proxy opens on first use and keeps are not growth), a second later.
    priming = _run_async(
        closed_loop(
            topo.targets,
            [next(mix) for _ in range(4 * len(topo.proxies))],
            concurrency=1,
            request_timeout_s=args.request_timeout_s,
            phase_timeout_s=60.0,
        )
    )
    time.sleep(1.0)
    baseline = _sum_census(topo.census())
    log(
        f"soak/{topo.name}: {args.soak_rps:g} requests/s for {duration:g} s "
        f"(warm-up {warmup:g} s); baseline {baseline}"
    )
    tally, extra = _run_async(_soak_async(topo, args, mix, duration, warmup))
    after_load = _sum_census(topo.census())
    settled, settle_s = _settle(topo, baseline, args.settle_s)
    warm_rss: list[int] = extra["rss_warm"]  # type: ignore[assignment]
    end_rss: list[int] = extra["rss_end"]  # type: ignore[assignment]
    growth = max(ratio(e - w, w) for w, e in zip(warm_rss, end_rss, strict=True))
    back = settled["fds"] <= baseline["fds"] and settled["sockets"] <= baseline["sockets"]
    result = tally.figures(prefix)
    result.update(
        {
            "soak_topology": topo.name,
            "soak_target_rps": args.soak_rps,
            "soak_s": duration,
            "soak_warmup_s": warmup,
            "soak_rss_mib_after_warmup": [round(kb / 1024, 1) for kb in warm_rss],
            "soak_rss_mib_end": [round(kb / 1024, 1) for kb in end_rss],
            "soak_rss_mib_max": [round(kb / 1024, 1) for kb in extra["rss_max"]],  # type: ignore[attr-defined]
            "soak_rss_growth": rounded(growth, 4),
            "soak_rss_series_mib": extra["series"],
            "soak_priming_errors": priming.error_count,
            "soak_fds_before": baseline,
            "soak_fds_peak": extra["peak_census"],
            "soak_fds_after_load": after_load,
            "soak_fds_settled": settled,
            "soak_fds_settle_s": round(settle_s, 1),
            "soak_fds_back_to_baseline": back,
            "soak_fds_excess": {
                key: value - baseline.get(key, 0)
                for key, value in settled.items()
                if value != baseline.get(key, 0)
            },
            "soak_proxy_metrics": topo.metrics(),
            "soak_proxy_log_problems": topo.log_problems(),
        }
    )
    _log_figures(prefix, result)
    log(
        f"  rss after warm-up {result['soak_rss_mib_after_warmup']} MiB, end "
        f"{result['soak_rss_mib_end']} MiB (growth {growth:.2%}); fds before {baseline}, "
        f"after load {after_load}, settled after {settle_s:.1f} s {settled}"
    )
    return result


# ----------------------------------------------------------------------------- driver


def _plan(args: argparse.Namespace) -> tuple[list[str], list[str], int, float]:
    """Parts, load topologies, requests per topology and soak seconds."""
    if args.parts:
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    elif args.soak:
        parts = ["soak"]
    else:
        parts = list(PARTS) if args.quick else ["load"]
    topologies = [t.strip() for t in args.topologies.split(",") if t.strip()]
    unknown = (set(parts) - set(PARTS)) | (set(topologies) - set(TOPOLOGIES))
    if unknown or not parts:
        raise BenchError(f"unknown parts or topologies: {sorted(unknown)}")
    requests = args.requests if args.requests is not None else (3000 if args.quick else 20000)
    soak_s = args.soak_s if args.soak_s is not None else (30.0 if args.quick else 600.0)
    if requests < 1 or soak_s <= 0 or args.concurrency < 1 or args.soak_rps <= 0:
        raise BenchError("--requests, --soak-s, --concurrency and --soak-rps must be positive")
    return parts, topologies, requests, soak_s


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run the benchmark; returns the figures (``emit`` prints them)."""
    parts, topologies, requests, soak_s = _plan(args)
    # Only backends named on the command line: $LEANGATE_BACKEND_URL may name a real
    # server others are measuring, and this benchmark brings its own responders.
    given = list(args.backend_url or [])
    redis_url = _with_db(args.redis_url, args.redis_db)
    run_id = uuid.uuid4().hex[:12]

    def mix(phase: str, index: int) -> Mix:
        """The phase's own requests: no phase hits entries another one stored."""
        return Mix(
            seed=args.seed + index,
            run_id=f"{run_id}-{phase}",
            stream_fraction=args.stream_fraction,
            repeat_fraction=args.repeat_fraction,
            hot_prompts=args.hot_prompts,
        )

    budget = 120.0 * (len(topologies) + 1)
    budget += (60.0 + requests * 0.02) * len(topologies) if "load" in parts else 0.0
    budget += soak_s + args.settle_s + 2 * args.request_timeout_s + 60 if "soak" in parts else 0.0
    started = time.monotonic()
    result: dict[str, object] = {
        "benchmark": "load",
        "parts": parts,
        "policy": "default (no --policy: the exact result cache for everything)",
        "redis": redis_url,
        "concurrency": args.concurrency,
        "stream_fraction": args.stream_fraction,
        "repeat_fraction": args.repeat_fraction,
        "hot_prompts": args.hot_prompts,
    }
    with watchdog(budget), redis_database(redis_url) as redis_report:
        if "load" in parts:
            for index, name in enumerate(topologies):
                with topology(name, args, redis_url, given) as topo:
                    result.update(_load_phase(topo, args, mix(name, index), requests))
        if "soak" in parts:
            with topology(args.soak_topology, args, redis_url, given) as topo:
                result.update(_soak_phase(topo, args, mix("soak", 100), soak_s))
    result.update(redis_report)
    result.update(_verdict(result, parts, topologies))
    result.update(
        {
            "quick": bool(args.quick),
            "seed": args.seed,
            "duration_s": round(time.monotonic() - started, 1),
            "machine": machine_info(),
        }
    )
    return result


def _verdict(
    result: dict[str, object], parts: list[str], topologies: list[str]
) -> dict[str, object]:
    prefixes = [f"{t}_" for t in topologies] if "load" in parts else []
    if "soak" in parts:
        prefixes.append("soak_")
    errors = sum(int(result[f"{p}errors"]) for p in prefixes)  # type: ignore[call-overload]
    verdict: dict[str, object] = {
        "errors": errors,
        "targets": {"errors": 0, "soak_rss_growth_max": MAX_RSS_GROWTH, "soak_fds_back": True},
    }
    ok = errors == 0
    if "soak" in parts:
        growth = result["soak_rss_growth"]
        ok = ok and isinstance(growth, float) and growth <= MAX_RSS_GROWTH
        ok = ok and bool(result["soak_fds_back_to_baseline"])
    verdict["passed"] = ok
    if not ok:
        log("WARNING: a goal failed (errors, memory growth or descriptors): see the figures")
    return verdict
