"""Tests of the shared benchmark machinery (leangate.bench.common)."""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import httpx
import numpy as np
import pytest

from leangate.bench.common import (
    BenchError,
    ClosedLoopClient,
    RawHTTPClient,
    add_common_arguments,
    arun_interleaved,
    cpu_seconds,
    emit,
    free_port,
    given_backend_urls,
    median,
    metric_total,
    normalize_base_url,
    percentile,
    proxy_command,
    ratio,
    run_interleaved,
    sequential_round,
    spawn_responder,
    spawn_service,
    wait_for_http,
)
from leangate.bench.responder import ResponderConfig, start_responder


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = [float(v) for v in np.random.default_rng(7).exponential(size=257)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_median_and_ratio() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0]) == 1.5
    assert math.isnan(median([]))
    assert ratio(1.0, 4.0) == 0.25
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))


def test_run_interleaved_alternates_and_drops_warmup() -> None:
    calls: list[str] = []
    seen: list[tuple[int, str]] = []
    counter = {"direct": 0, "proxy": 0}

    def arm(name: str) -> tuple[str, Callable[[], int]]:
        def fn() -> int:
            calls.append(name)
            counter[name] += 1
            return counter[name]

        return name, fn

    results = run_interleaved(
        [arm("direct"), arm("proxy")],
        rounds=3,
        warmup_rounds=2,
        on_round=lambda i, name, _r: seen.append((i, name)),
    )
    assert calls == ["direct", "proxy"] * 5
    assert results == {"direct": [3, 4, 5], "proxy": [3, 4, 5]}
    assert [i for i, _ in seen] == [-2, -2, -1, -1, 0, 0, 1, 1, 2, 2]


async def test_arun_interleaved_alternates() -> None:
    calls: list[str] = []

    def arm(name: str) -> Callable[[], Awaitable[str]]:
        async def fn() -> str:
            calls.append(name)
            return f"{name}{len(calls)}"

        return fn

    results = await arun_interleaved(
        [("a", arm("a")), ("b", arm("b"))],
        rounds=2,
        warmup_rounds=1,
    )
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert results == {"a": ["a3", "a5"], "b": ["b4", "b6"]}


def test_normalize_and_given_backend_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000"
    assert normalize_base_url(" http://h:8000 ") == "http://h:8000"
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    monkeypatch.setenv("LEANGATE_BACKEND_URL", "http://a:1/v1, http://b:2")
    assert given_backend_urls(parser.parse_args([])) == ["http://a:1", "http://b:2"]
    args = parser.parse_args(["--backend-url", "http://x:1", "--backend-url", "http://y:2/v1"])
    assert given_backend_urls(args) == ["http://x:1", "http://y:2"]
    monkeypatch.delenv("LEANGATE_BACKEND_URL")
    assert given_backend_urls(parser.parse_args([])) == []


def test_common_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://r:6379/0")
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    args = parser.parse_args(["--quick", "--rounds", "4", "--seed", "9"])
    assert (args.quick, args.rounds, args.seed) == (True, 4, 9)
    assert args.redis_url == "redis://r:6379/0"


def test_proxy_command_shape() -> None:
    cmd = proxy_command(
        ["http://a:1", "http://b:2"], port=1234, policy="p.yaml", redis_url="redis://r"
    )
    assert cmd[:4] == [sys.executable, "-m", "leangate", "serve"]
    assert cmd[4:] == [
        "--host",
        "127.0.0.1",
        "--port",
        "1234",
        "--backend-url",
        "http://a:1",
        "--backend-url",
        "http://b:2",
        "--policy",
        "p.yaml",
        "--redis-url",
        "redis://r",
    ]
    assert proxy_command(["u"], port=1, base_command="x -m y")[:3] == ["x", "-m", "y"]


def test_emit_prints_one_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    print("progress noise")
    emit({"a": 1.5, "nan": math.nan, "nested": {"inf": math.inf}, "list": [1, math.nan]})
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[-1]) == {
        "a": 1.5,
        "nan": None,
        "nested": {"inf": None},
        "list": [1, None],
    }


def test_cpu_seconds_counts_own_work() -> None:
    before = cpu_seconds(os.getpid(), include_descendants=False)
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.05


def test_spawn_service_reports_output_tail_on_failure() -> None:
    cmd = [sys.executable, "-c", "import sys; print('boom-marker', file=sys.stderr); sys.exit(3)"]
    with (
        pytest.raises(BenchError, match=r"(?s)exited with code 3.*boom-marker"),
        spawn_service("broken", cmd, port=1, startup_timeout_s=10),
    ):
        pass


def test_raw_client_against_spawned_responder() -> None:
    with spawn_responder(model="m1", stream_chunks=3, chunk_interval_ms=1) as responder:
        assert responder.cpu_seconds() >= 0
        with RawHTTPClient(responder.url) as client:
            models = client.send(client.build_request("GET", "/v1/models"))
            assert models.status == 200
            assert json.loads(models.body)["data"][0]["id"] == "m1"

            body = json.dumps({"model": "m2", "messages": [], "stream": True}).encode()
            request = client.build_request("POST", "/v1/chat/completions", body)
            start = time.perf_counter()
            streamed = client.send(request, watch_first_token=True)
            assert streamed.status == 200
            assert streamed.body.endswith(b"data: [DONE]\n\n")
            assert streamed.first_token_at is not None
            assert streamed.first_token_at > start

            plain = json.dumps({"model": "m2", "messages": []}).encode()
            sample = sequential_round(
                client, client.build_request("POST", "/v1/chat/completions", plain), 50
            )
            assert sample.errors == 0
            assert len(sample.latencies) == 50
            assert all(t > 0 for t in sample.latencies)
    assert responder.process.poll() is not None  # stopped on exit


def test_wait_for_http_times_out_with_clear_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(BenchError, match="not answering GET /v1/models"):
        wait_for_http(f"http://127.0.0.1:{port}", timeout_s=0.5)


async def test_closed_loop_client_keeps_n_connections_busy() -> None:
    server = await start_responder(ResponderConfig())
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    body = json.dumps({"model": "m", "messages": []}).encode()
    client = ClosedLoopClient(
        url, RawHTTPClient(url).build_request("POST", "/v1/chat/completions", body), 8
    )
    try:
        await client.open()
        first = await client.run(100)
        client.close()  # as when a server drops idle keep-alive connections (uvicorn: 5 s)
        await asyncio.sleep(0.05)
        second = await client.run(3)
        nothing = await client.run(0)
    finally:
        client.close()
    async with httpx.AsyncClient(trust_env=False) as http:
        stats = (await http.get(url + "/stats")).json()
    server.close()
    await server.wait_closed()
    assert (len(first.latencies), first.errors) == (100, 0)
    assert (len(second.latencies), second.errors) == (3, 0)
    assert (len(nothing.latencies), nothing.errors) == (0, 0)
    assert stats["connections_opened"] == 8 + 8 + 1
    assert stats["requests"] == 103 + 1


async def test_closed_loop_client_counts_errors() -> None:
    server = await start_responder(ResponderConfig())
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = ClosedLoopClient(url, RawHTTPClient(url).build_request("GET", "/nowhere"), 4)
    try:
        await client.open()
        sample = await client.run(10)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert (len(sample.latencies), sample.errors) == (0, 10)


async def test_closed_loop_client_resends_on_connections_the_server_closes() -> None:
    server = await start_responder(ResponderConfig())
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    body = json.dumps({"model": "m", "messages": []}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    client = ClosedLoopClient(url, request, 4)
    try:
        sample = await client.run(40)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert (len(sample.latencies), sample.errors) == (40, 0)


METRICS_PAGE = b"""# TYPE leangate_subrequests_total counter
leangate_subrequests_total{stage="sot",kind="stream",outcome="ok"} 3.0
leangate_subrequests_total{stage="sot",kind="stream",outcome="cancelled"} 2.0
leangate_subrequests_total{stage="decompose",kind="whole",outcome="ok"} 4.0
leangate_subrequests_created{stage="sot",kind="stream",outcome="ok"} 1.7e9
leangate_subrequests_total_other{outcome="ok"} 100.0
"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", str(len(METRICS_PAGE)))
        self.end_headers()
        self.wfile.write(METRICS_PAGE)

    def log_message(self, *args: object) -> None:
        pass


def test_metric_total_sums_a_metric_and_filters_by_labels() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        name = "leangate_subrequests_total"
        assert metric_total(url, name) == 9.0
        assert metric_total(url, name, outcome="ok") == 7.0
        assert metric_total(url, name, outcome="ok", stage="sot") == 3.0
        assert metric_total(url, name, kind="stream", outcome="cancelled") == 2.0
        assert metric_total(url, name, outcome="error") == 0.0
    finally:
        server.shutdown()
        server.server_close()
