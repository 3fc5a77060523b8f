"""``leangate bench load`` at small counts: its JSON line, and failures counted as errors.

Each test runs the command as a subprocess (responders and proxies included) against the
test Redis, in a database of its own (``--redis-db 12``), and reads the last stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from leangate.bench.common import free_port
from leangate.bench.load import (
    AnswerError,
    LoadRequest,
    Mix,
    Response,
    _ResponseParser,
    check_answer,
)

REDIS_DB = "12"


def _bench(redis_url: str, *extra: str, timeout_s: float = 60.0) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "LEANGATE_BACKEND_URL"}
    command = [sys.executable, "-m", "leangate", "bench", "load", "--redis-url", redis_url]
    done = subprocess.run(
        [*command, "--redis-db", REDIS_DB, *extra],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(last)
    return result


@pytest.mark.timeout(90)
def test_load_and_soak_figures(redis_url: str) -> None:
    result = _bench(
        redis_url,
        *("--parts", "load,soak", "--topologies", "single"),
        *("--requests", "400", "--concurrency", "32", "--hot-prompts", "20"),
        *("--soak-s", "3", "--soak-rps", "50", "--settle-s", "2"),
    )
    assert result["benchmark"] == "load"
    assert result["errors"] == 0
    assert result["single_requests"] == result["single_ok"] == 400
    assert result["single_stream_requests"] + result["single_plain_requests"] == 400
    assert 100 < result["single_stream_requests"] < 300  # about half of them stream
    for kind in ("stream", "plain"):
        assert 0 < result[f"single_{kind}_p50_ms"] <= result[f"single_{kind}_p99_ms"]
    assert result["single_throughput_rps"] > 0
    # 20 repeated prompts among ~200 requests: most repeats are hits or coalesced.
    assert 0 < result["single_hit_ratio"] <= result["single_hit_ratio_ceiling"] < 0.5
    assert result["single_cache_outcomes"].get("miss", 0) > 0
    assert result["soak_requests"] == result["soak_ok"] == 150
    assert result["soak_priming_errors"] == 0
    assert result["soak_rss_mib_after_warmup"][0] > 0
    assert isinstance(result["soak_rss_growth"], float)
    assert result["soak_fds_before"]["sockets_listening"] == 1
    assert result["soak_fds_peak"]["fds"] >= result["soak_fds_before"]["fds"]
    assert isinstance(result["soak_fds_back_to_baseline"], bool)
    assert result["redis_keys_deleted"] > 0


@pytest.mark.timeout(60)
def test_a_dead_backend_counts_errors(redis_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = _bench(
        redis_url,
        *("--parts", "load", "--topologies", "single", "--backend-url", dead),
        *("--requests", "40", "--concurrency", "8", "--request-timeout-s", "10"),
    )
    assert result["single_errors"] == 40
    assert result["errors"] == 40
    assert result["passed"] is False
    assert all(kind.startswith("status 5") for kind in result["single_error_kinds"])


def _parse(*pieces: bytes) -> Response:
    parser = _ResponseParser()
    done = False
    for piece in pieces:
        done = parser.feed(piece)
    assert done
    return parser.response()


def test_streams_are_checked_to_the_end() -> None:
    event = b'data: {"choices":[{"delta":{"content":"Hello from the benchmark responder."}}]}\n\n'
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    whole = head + chunk(event) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    # Split anywhere, the same answer.
    for cut in (10, len(head) + 3, len(whole) - 2):
        assert check_answer(_parse(whole[:cut], whole[cut:]), stream=True) is None
    no_done = _parse(head + chunk(event) + b"0\r\n\r\n")
    assert check_answer(no_done, stream=True) == "stream: no data: [DONE] at the end"
    parser = _ResponseParser()
    assert not parser.feed(head + chunk(event))  # the body's end is still to come
    with pytest.raises(AnswerError):
        _ResponseParser().feed(head + b"zz\r\n")
    error = _parse(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 2\r\n\r\n{}")
    assert check_answer(error, stream=False) == "status 502"


def test_the_mix_is_seeded_and_half_streamed() -> None:
    def requests() -> list[LoadRequest]:
        mix = Mix(seed=3, run_id="t", stream_fraction=0.5, repeat_fraction=0.5, hot_prompts=5)
        return mix.take(1000)

    first = requests()
    assert first == requests()
    assert 400 < sum(r.stream for r in first) < 600
    assert 400 < sum(r.repeated for r in first) < 600
    repeated = {r.data.split(b"\r\n\r\n", 1)[1].replace(b',"stream":true', b"") for r in first}
    assert len(repeated) < 600  # five repeated prompts, the rest unique
