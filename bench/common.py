"""Shared machinery for every ``leangate bench <name>`` subcommand.

Conventions every benchmark follows:

* figures are ratios/differences against the direct-to-backend baseline measured in
  the same run, from interleaved rounds (direct, proxy, direct, proxy, ...) after a
  warm-up, summarised with medians across rounds;
* progress goes to stderr via :func:`log`; the final JSON object is printed on the
  last line of stdout by :func:`emit`;
* the proxy and any helper servers run as subprocesses (:func:`spawn_proxy`,
  :func:`spawn_responder`), so their CPU time can be read from ``/proc``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import importlib
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, TypeVar, cast
from urllib.parse import urlsplit

T = TypeVar("T")

BACKEND_URL_ENV = "LEANGATE_BACKEND_URL"
REDIS_URL_ENV = "REDIS_URL"
PROXY_COMMAND_ENV = "LEANGATE_BENCH_PROXY_COMMAND"
DEFAULT_VLLM_PORT = 8000


class BenchError(RuntimeError):
    """A benchmark could not run (service failed to start, bad response, ...)."""


# --------------------------------------------------------------------------- output


def log(message: str) -> None:
    """Progress line on stderr (stdout is reserved for the final JSON line)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _json_safe(value: object) -> object:
    """Replace NaN/inf (not valid JSON) by ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def emit(result: Mapping[str, object]) -> None:
    """Print ``result`` as one compact JSON object on the last line of stdout."""
    sys.stderr.flush()
    line = json.dumps(_json_safe(dict(result)), allow_nan=False, separators=(",", ":"))
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def machine_info() -> dict[str, object]:
    """Context for the result: the machine is shared and noisy, so record its load."""
    load1, load5, _ = os.getloadavg()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(load1, 2),
        "loadavg_5m": round(load5, 2),
    }


# ------------------------------------------------------------------------ arguments


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by all benchmarks."""
    parser.add_argument(
        "--backend-url",
        action="append",
        default=None,
        metavar="URL",
        help=f"OpenAI-compatible backend (repeatable; default ${BACKEND_URL_ENV}, "
        "else the bundled local vLLM is started)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV),
        help=f"Redis URL (default ${REDIS_URL_ENV})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="reduced set, finishes in under 3 minutes"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measured interleaved rounds per arm (default depends on --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--proxy-command",
        default=os.environ.get(PROXY_COMMAND_ENV),
        help="override the command that starts the proxy (default: "
        "'<python> -m leangate serve'); it receives --host/--port/--backend-url",
    )


def resolve_rounds(args: argparse.Namespace, *, quick: int, full: int) -> int:
    """``--rounds`` if given, else the quick/full default."""
    rounds = args.rounds if args.rounds is not None else (quick if args.quick else full)
    if rounds < 1:
        raise BenchError("--rounds must be >= 1")
    return int(rounds)


def normalize_base_url(url: str) -> str:
    """``http://h:p/v1/`` -> ``http://h:p``: services are addressed without ``/v1``."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def given_backend_urls(args: argparse.Namespace) -> list[str]:
    """Backend URLs from ``--backend-url`` or the environment (may be empty)."""
    urls: list[str] = list(getattr(args, "backend_url", None) or [])
    if not urls:
        env = os.environ.get(BACKEND_URL_ENV, "")
        urls = [u for u in re.split(r"[,\s]+", env) if u]
    return [normalize_base_url(u) for u in urls]


class _Startable(Protocol):
    def start(self) -> str: ...
    def stop(self) -> None: ...


def _local_vllm(port: int) -> _Startable:
    """``LocalVLLM(LocalVLLMConfig(port=port))``, imported lazily.

    Lazy because the launcher is only needed without ``--backend-url``; by module
    name because mypy, run on the source folders, cannot map ``leangate.backend``
    (a package-dir mapping of the folder ``backend/``).
    """
    module = importlib.import_module("leangate.backend.localvllm")
    server: _Startable = module.LocalVLLM(module.LocalVLLMConfig(port=port))
    return server


@contextlib.contextmanager
def backend_urls(args: argparse.Namespace) -> Iterator[list[str]]:
    """Yield the backend base URLs (no ``/v1``); start the bundled vLLM if none given."""
    urls = given_backend_urls(args)
    if urls:
        yield urls
        return
    port = int(os.environ.get("LEANGATE_VLLM_PORT", DEFAULT_VLLM_PORT))
    log(f"no backend URL given; starting the bundled local vLLM on port {port}")
    server = _local_vllm(port)
    base = normalize_base_url(server.start())
    try:
        yield [base]
    finally:
        server.stop()


# ---------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """``q``-th percentile (0..100) with linear interpolation (numpy's default)."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile out of range: {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    frac = pos - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


def median(values: Sequence[float]) -> float:
    """Median, NaN for an empty sequence."""
    return float(statistics.median(values)) if values else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when undefined."""
    if denominator == 0 or math.isnan(denominator) or math.isnan(numerator):
        return math.nan
    return numerator / denominator


def rounded(value: float, digits: int = 4) -> float:
    """Round for the JSON output, keeping NaN (emitted as null)."""
    return value if math.isnan(value) else round(value, digits)


# ---------------------------------------------------------------- interleaved runs


def run_interleaved(
    arms: Sequence[tuple[str, Callable[[], T]]],
    *,
    rounds: int,
    warmup_rounds: int = 1,
    on_round: Callable[[int, str, T], None] | None = None,
) -> dict[str, list[T]]:
    """Run ``arms`` in strict alternation, round after round: A, B, A, B, ...

    Interleaving spreads slow drift of a noisy machine evenly over the arms.  The
    first ``warmup_rounds`` rounds are run but not returned.  ``on_round`` gets the
    measured round index (negative during warm-up), the arm name and its result.
    """
    results: dict[str, list[T]] = {name: [] for name, _ in arms}
    for index in range(-warmup_rounds, rounds):
        for name, fn in arms:
            gc.collect()
            outcome = fn()
            if on_round is not None:
                on_round(index, name, outcome)
            if index >= 0:
                results[name].append(outcome)
    return results


async def arun_interleaved(
    arms: Sequence[tuple[str, Callable[[], Awaitable[T]]]],
    *,
    rounds: int,
    warmup_rounds: int = 1,
    on_round: Callable[[int, str, T], None] | None = None,
) -> dict[str, list[T]]:
    """Async twin of :func:`run_interleaved`."""
    results: dict[str, list[T]] = {name: [] for name, _ in arms}
    for index in range(-warmup_rounds, rounds):
        for name, fn in arms:
            gc.collect()
            outcome = await fn()
            if on_round is not None:
                on_round(index, name, outcome)
            if index >= 0:
                results[name].append(outcome)
    return results


# ---------------------------------------------------------------------- CPU time


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_stat(pid: int) -> tuple[int, float] | None:
    """``(ppid, utime+stime seconds)`` of ``pid`` from ``/proc``, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces/parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    ppid = int(fields[1])
    ticks = int(fields[11]) + int(fields[12])
    return ppid, ticks / _CLK_TCK


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cpu_seconds(pid: int, *, include_descendants: bool = True) -> float:
    """User+system CPU seconds consumed so far by ``pid`` (and its live descendants).

    Descendants matter when the server forks workers.  Resolution is one clock tick
    (usually 10 ms), so measure deltas over many requests.
    """
    stat = _read_stat(pid)
    if stat is None:
        raise BenchError(f"process {pid} is gone")
    total = stat[1]
    if include_descendants:
        for child in _descendants(pid):
            child_stat = _read_stat(child)
            if child_stat is not None:
                total += child_stat[1]
    return total


# ------------------------------------------------------------------ subprocesses


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (tiny race before the child binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class SpawnedService:
    """A benchmark-owned server subprocess."""

    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_file: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the service's combined stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no output>"
        return "\n".join(text.splitlines()[-lines:]) or "<no output>"


def _health_ok(host: str, port: int, path: str) -> bool:
    """One health probe.  http.client, unlike urllib, ignores *_proxy env vars."""
    conn = http.client.HTTPConnection(host, port, timeout=2.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_for_http(base_url: str, path: str = "/v1/models", *, timeout_s: float = 60.0) -> None:
    """Wait until ``GET base_url+path`` answers 200 (a backend may be restarting)."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    deadline = time.monotonic() + timeout_s
    announced = False
    while not _health_ok(host, port, parts.path.rstrip("/") + path):
        if time.monotonic() > deadline:
            raise BenchError(f"backend {base_url} not answering GET {path} after {timeout_s:.0f}s")
        if not announced:
            log(f"waiting up to {timeout_s:.0f}s for {base_url}{path} ...")
            announced = True
        time.sleep(1.0)


def _wait_healthy(service: SpawnedService, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = service.process.poll()
        if code is not None:
            raise BenchError(
                f"{service.name} exited with code {code} before becoming healthy; "
                f"output tail:\n{service.log_tail()}"
            )
        if _health_ok("127.0.0.1", service.port, path):
            return
        time.sleep(0.1)
    raise BenchError(
        f"{service.name} not healthy at {service.url}{path} after {timeout_s:.0f}s; "
        f"output tail:\n{service.log_tail()}"
    )


def _stop(service: SpawnedService, grace_s: float = 10.0) -> None:
    """SIGTERM the service's own process group, then SIGKILL it if it lingers."""
    proc = service.process
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace_s)
    service._log_file.close()
    with contextlib.suppress(FileNotFoundError):
        service.log_path.unlink()


@contextlib.contextmanager
def spawn_service(
    name: str,
    command: Sequence[str],
    *,
    port: int,
    health_path: str = "/health",
    startup_timeout_s: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[SpawnedService]:
    """Start ``command`` (which must listen on 127.0.0.1:``port``), wait for health.

    Output goes to a temporary file rather than a pipe, so a chatty server can never
    block on a full pipe; its tail is shown if the service fails to start.
    """
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in _stop
        prefix=f"leangate-bench-{name}-", suffix=".log", delete=False
    )
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    process = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=full_env,
        start_new_session=True,  # own process group: clean shutdown of any workers
    )
    service = SpawnedService(
        name=name,
        url=f"http://127.0.0.1:{port}",
        port=port,
        process=process,
        log_path=Path(log_file.name),
        _log_file=log_file,
    )
    try:
        _wait_healthy(service, health_path, startup_timeout_s)
        log(f"{name} ready at {service.url} (pid {process.pid})")
        yield service
    finally:
        _stop(service)


def proxy_command(
    backend_urls: Sequence[str],
    *,
    port: int,
    policy: str | Path | None = None,
    redis_url: str | None = None,
    base_command: Sequence[str] | str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Command line of the proxy under test."""
    if base_command is None:
        base = [sys.executable, "-m", "leangate", "serve"]
    elif isinstance(base_command, str):
        base = shlex.split(base_command)
    else:
        base = list(base_command)
    cmd = [*base, "--host", "127.0.0.1", "--port", str(port)]
    for url in backend_urls:
        cmd += ["--backend-url", url]
    if policy is not None:
        cmd += ["--policy", str(policy)]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    return [*cmd, *extra_args]


@contextlib.contextmanager
def spawn_proxy(
    backend_urls: Sequence[str],
    *,
    policy: str | Path | None = None,
    redis_url: str | None = None,
    base_command: Sequence[str] | str | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 60.0,
) -> Iterator[SpawnedService]:
    """Run the proxy under test on a free port until the block exits."""
    port = free_port()
    cmd = proxy_command(
        backend_urls,
        port=port,
        policy=policy,
        redis_url=redis_url,
        base_command=base_command,
        extra_args=extra_args,
    )
    log(f"starting proxy: {shlex.join(cmd)}")
    with spawn_service(
        "proxy", cmd, port=port, startup_timeout_s=startup_timeout_s, env=env
    ) as service:
        yield service


@contextlib.contextmanager
def spawn_responder(
    *,
    model: str = "bench-model",
    stream_chunks: int = 4,
    chunk_interval_ms: float = 0.0,
    startup_timeout_s: float = 30.0,
) -> Iterator[SpawnedService]:
    """Run the minimal OpenAI-compatible responder (``bench/responder.py``)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "leangate.bench.responder",
        "--port",
        str(port),
        "--model",
        model,
        "--stream-chunks",
        str(stream_chunks),
        "--chunk-interval-ms",
        str(chunk_interval_ms),
    ]
    with spawn_service("responder", cmd, port=port, startup_timeout_s=startup_timeout_s) as svc:
        yield svc


# ------------------------------------------------------------ raw HTTP/1.1 client

# First SSE event carrying generated text: ``"content": "x`` / ``"text":"x`` (non-empty).
_FIRST_TOKEN_RE = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')


@dataclass(frozen=True)
class RawResponse:
    """Response of :class:`RawHTTPClient`; times are ``perf_counter`` seconds."""

    status: int
    body: bytes
    first_token_at: float | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    """Lower-cased header names; a repeated header keeps its last value."""


class RawHTTPClient:
    """Minimal blocking keep-alive HTTP/1.1 client for concurrency-1 latency loops.

    A tight loop over one socket costs a few tens of microseconds per request, far
    less (and far less jittery) than an asyncio client, so the client does not blur
    the sub-millisecond differences being measured.
    """

    def __init__(self, base_url: str, *, timeout_s: float = 120.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise BenchError(f"only plain http:// URLs are supported: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._rfile: IO[bytes] | None = None

    def close(self) -> None:
        if self._rfile is not None:
            self._rfile.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._rfile = None

    def __enter__(self) -> RawHTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> tuple[socket.socket, IO[bytes]]:
        if self._sock is None or self._rfile is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            rfile = cast(IO[bytes], sock.makefile("rb", buffering=65536))
            self._rfile = rfile
            return sock, rfile
        return self._sock, self._rfile

    def build_request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """Pre-serialised request bytes (build once, send many times)."""
        lines = [
            f"{method} {self.prefix}{path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Accept: */*",
        ]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    def send(self, request: bytes, *, watch_first_token: bool = False) -> RawResponse:
        """Send pre-built ``request``; read the whole response (reconnect if closed)."""
        try:
            return self._send_once(request, watch_first_token)
        except (ConnectionError, BenchError):
            # Stale keep-alive connection closed by the server: retry once, fresh.
            self.close()
            return self._send_once(request, watch_first_token)

    def _send_once(self, request: bytes, watch_first_token: bool) -> RawResponse:
        sock, rfile = self._connection()
        sock.sendall(request)
        status_line = rfile.readline(65537)
        if not status_line:
            raise BenchError("connection closed before response")
        status = int(status_line.split(None, 2)[1])
        length: int | None = None
        headers: dict[bytes, bytes] = {}
        chunked = False
        close = False
        while True:
            line = rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            headers[key] = value.strip()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif key == b"connection":
                close = b"close" in value.lower()
        if chunked:
            body, first = _read_chunked(rfile, watch_first_token)
        elif length is not None:
            body = rfile.read(length)
            first = time.perf_counter() if watch_first_token else None
        else:
            body, close = rfile.read(), True
            first = time.perf_counter() if watch_first_token else None
        if close:
            self.close()
        return RawResponse(status=status, body=body, first_token_at=first, headers=headers)


def _read_chunked(rfile: IO[bytes], watch_first_token: bool) -> tuple[bytes, float | None]:
    """Read a chunked body; note when the first non-empty token arrives."""
    parts: list[bytes] = []
    first: float | None = None
    seen = b""
    while True:
        size_line = rfile.readline(65537)
        if not size_line:
            raise BenchError("connection closed inside chunked body")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts), first
        chunk = rfile.read(size)
        rfile.readline(65537)
        parts.append(chunk)
        if watch_first_token and first is None:
            # Keep a short tail so a marker split across chunks is still found.
            seen = seen[-64:] + chunk
            if _FIRST_TOKEN_RE.search(seen):
                first = time.perf_counter()


@dataclass
class LatencySample:
    """Per-request timings (seconds) of one round at concurrency 1."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0


def sequential_round(
    client: RawHTTPClient,
    request: bytes,
    count: int,
    *,
    watch_first_token: bool = False,
) -> LatencySample:
    """``count`` back-to-back requests on one keep-alive connection (concurrency 1).

    The cyclic GC is paused inside the loop so client-side collections do not land
    in one arm's timings more than the other's.
    """
    sample = LatencySample()
    perf = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(count):
            start = perf()
            response = client.send(request, watch_first_token=watch_first_token)
            end = perf()
            if response.status != 200:
                sample.errors += 1
                continue
            sample.latencies.append(end - start)
            if response.first_token_at is not None:
                sample.ttfts.append(response.first_token_at - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return sample


def header_fields(header: str) -> dict[str, str]:
    """A leangate header such as ``sot; reason=faster; points=6``: its first part as
    ``decision``, then its ``key=value`` parts."""
    parts = [part.strip() for part in header.split(";")]
    fields = {"decision": parts[0] if parts else ""}
    fields.update(dict(part.split("=", 1) for part in parts[1:] if "=" in part))
    return fields


def metric_total(base_url: str, name: str, **labels: str) -> float:
    """Sum of every sample of metric ``name`` on a Prometheus ``/metrics`` page, of those
    that carry ``labels`` when given."""
    import httpx

    text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
    wanted = [f'{label}="{value}"' for label, value in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name)
        and line[len(name)] in " {"
        and all(f"{{{w}" in line or f",{w}" in line for w in wanted)
    )


# ------------------------------------------------------- closed-loop load at concurrency N


class _LoadConnection(asyncio.Protocol):
    """One keep-alive connection of :class:`ClosedLoopClient`: sends its next request as
    soon as the answer to the last one (``content-length`` framed) is complete."""

    def __init__(self, pool: ClosedLoopClient) -> None:
        self._pool = pool
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._started = 0.0
        self.waiting = False
        """A request was sent and no byte of its answer has arrived yet."""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pool.connection_lost(self)

    @property
    def is_open(self) -> bool:
        return self._transport is not None

    @property
    def partial(self) -> bool:
        """Part of an answer has arrived, not all of it."""
        return bool(self._buffer)

    def send_next(self) -> None:
        if self._transport is None:
            self._pool.resend(self)
            return
        self._started = time.perf_counter()
        self.waiting = True
        self._transport.write(self._pool.request)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self.waiting = False
        self._buffer += data
        buf = self._buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        marker = head.find(b"\r\ncontent-length:")
        if marker < 0:
            self._pool.fail(BenchError("closed-loop client: answer without content-length"))
            return
        length = int(head[marker + 17 :].split(b"\r\n", 1)[0])
        total = end + 4 + length
        if len(buf) < total:
            return
        status = int(head[9:12])
        del buf[:total]
        self._pool.completed(self, status, time.perf_counter() - self._started)


class ClosedLoopClient:
    """``concurrency`` keep-alive connections, each sending one pre-built request after
    another: the offered load of a closed loop.

    A hand-rolled protocol costs the load generator a few tens of microseconds per
    request, several times less than aiohttp, so on a 2-core machine the server under
    test, not the client, is what saturates. Only ``content-length`` answers are
    understood (plain completions, not streams).
    """

    def __init__(self, base_url: str, request: bytes, concurrency: int) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.request = request
        self.concurrency = concurrency
        self._connections: list[_LoadConnection] = []
        self._round: _LoadRound | None = None
        self._resends: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Open the connections, again any the server has closed since (servers close
        idle keep-alive connections: uvicorn after 5 s)."""
        self._connections = [c for c in self._connections if c.is_open]
        while len(self._connections) < self.concurrency:
            self._connections.append(await self._connect())

    async def _connect(self) -> _LoadConnection:
        _, protocol = await asyncio.get_running_loop().create_connection(
            lambda: _LoadConnection(self), self.host, self.port
        )
        await protocol.ready
        return protocol

    def close(self) -> None:
        for connection in self._connections:
            connection.close()

    async def run(self, total: int) -> LatencySample:
        """Send ``total`` requests over all connections; time each one."""
        if total <= 0:
            return LatencySample()
        await self.open()
        load = _LoadRound(total, asyncio.get_running_loop().create_future())
        self._round = load
        for connection in self._connections[:total]:
            load.sent += 1
            connection.send_next()
        try:
            await load.done
        finally:
            self._round = None
        return load.sample

    def completed(self, connection: _LoadConnection, status: int, seconds: float) -> None:
        load = self._round
        if load is None:
            return
        if status == 200:
            load.sample.latencies.append(seconds)
        else:
            load.sample.errors += 1
        if load.sent < load.total:
            load.sent += 1
            connection.send_next()
        elif len(load.sample.latencies) + load.sample.errors == load.total:
            load.finish(None)

    def fail(self, exc: BaseException) -> None:
        if self._round is not None:
            self._round.finish(exc)

    def connection_lost(self, connection: _LoadConnection) -> None:
        """A server may close an idle keep-alive connection just as a request is sent on
        it; like a browser, send that request again on a new connection."""
        if self._round is None:
            return
        if connection.partial:
            self.fail(BenchError("closed-loop client: a connection closed inside an answer"))
        elif connection.waiting:
            self.resend(connection)

    def resend(self, lost: _LoadConnection) -> None:
        task = asyncio.get_running_loop().create_task(self._resend(lost))
        self._resends.add(task)
        task.add_done_callback(self._resends.discard)

    async def _resend(self, lost: _LoadConnection) -> None:
        try:
            fresh = await self._connect()
        except OSError as exc:
            self.fail(exc)
            return
        self._connections[self._connections.index(lost)] = fresh
        fresh.send_next()


@dataclass
class _LoadRound:
    total: int
    done: asyncio.Future[None]
    sent: int = 0
    sample: LatencySample = field(default_factory=lambda: LatencySample())

    def finish(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)


def tokens_counter() -> tuple[Callable[[str], int], Path | None]:
    """Token counts with the bundled model's own tokenizer when its folder is here (else
    4 characters a token), and that folder."""
    from leangate.backend.localvllm import LocalVLLMConfig

    folder = LocalVLLMConfig().model_dir
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids), folder
    return lambda text: max(1, round(len(text) / 4)), None


def tokenizer_env(folder: Path | None) -> dict[str, str]:
    """The environment that gives a spawned proxy the bundled model's tokenizer."""
    from leangate.backend.localvllm import MODEL_NAME

    return {"LEANGATE_TOKENIZER_DIRS": json.dumps({MODEL_NAME: str(folder)})} if folder else {}
