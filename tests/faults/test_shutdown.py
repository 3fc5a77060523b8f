"""SIGTERM: ``leangate serve`` stops taking connections, lets what is in flight finish
within its drain timeout (``LEANGATE_DRAIN_TIMEOUT_S``), cuts what is left (a stream ends
with an error event, a plain request gets a 503), and exits."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import NO_STAGES, free_port, wait_for, write_policy
from fault_helpers import TEXT, Responder, Served, chat, cycled, refused, streamed_text

DRAIN_S = 5


def _stream(url: str, body: dict[str, Any]) -> tuple[list[str], str | None, float]:
    """A stream's lines as read until it ended, how it failed (if it did) and when."""
    lines: list[str] = []
    failure: str | None = None
    try:
        with httpx.stream("POST", url, json=body, timeout=60) as answer:
            lines.extend(line for line in answer.iter_lines() if line)
    except httpx.HTTPError as exc:
        failure = repr(exc)
    return lines, failure, time.monotonic()


def _plain(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, json=body, timeout=60)


@pytest.mark.timeout(60)
def test_sigterm_drains_requests_in_flight_then_exits(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, NO_STAGES)
    with (
        Responder(free_port()) as backend,
        Served(
            free_port(),
            ["--backend-url", backend.url, "--policy", str(policy)],
            tmp_path / "serve.log",
            env={"LEANGATE_DRAIN_TIMEOUT_S": str(DRAIN_S)},
        ) as proxy,
        ThreadPoolExecutor(4) as pool,
    ):
        url = proxy.url + "/v1/chat/completions"
        # 30 events 100 ms apart (3 s); a plain answer after 2 s; 600 events (60 s).
        short = chat("A", stream=True, responder={"chunks": 30, "chunk_interval_ms": 100})
        stream = pool.submit(_stream, url, short)
        plain = pool.submit(_plain, url, chat("B", responder={"delay_ms": 2000}))
        long = chat("C", stream=True, responder={"chunks": 600, "chunk_interval_ms": 100})
        endless = pool.submit(_stream, url, long)
        stuck = pool.submit(_plain, url, chat("D", responder={"delay_ms": 60_000}))
        wait_for(lambda: backend.stats()["active"] == 4, 10, "the requests never reached it")
        signalled = time.monotonic()
        proxy.terminate()

        wait_for(lambda: refused(proxy.port), 2, "new connections are still taken")
        assert not stream.done() and not plain.done(), "refusing while the others drain"

        lines, failure, _ = stream.result(timeout=DRAIN_S + 10)
        assert failure is None, failure
        payloads = [line.removeprefix("data: ") for line in lines]
        assert payloads[-1] == "[DONE]" and len(payloads) == 31
        assert streamed_text(payloads[:-1]) == cycled(30)
        answer = plain.result(timeout=DRAIN_S + 10)
        assert (
            answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == TEXT
        )

        # What is left at the drain timeout is cut: the client reads the events sent so
        # far, then an error event and the end of the body, never a [DONE].
        cut, cut_failure, cut_at = endless.result(timeout=DRAIN_S + 10)
        assert cut_failure is None, cut_failure
        assert "data: [DONE]" not in cut, "a stream cut at the drain timeout is not whole"
        *sent, last = [line.removeprefix("data: ") for line in cut]
        assert sent and cycled(600).startswith(streamed_text(sent)), "whole events before it"
        error = json.loads(last)["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", "server_shutting_down")
        assert DRAIN_S - 0.5 < cut_at - signalled < DRAIN_S + 3, cut_at - signalled
        # A plain request still unanswered then gets a 503 it can retry elsewhere.
        refusal = stuck.result(timeout=DRAIN_S + 10)
        assert refusal.status_code == 503, refusal.text
        assert refusal.json()["error"]["code"] == "server_shutting_down"

        proxy.process.wait(DRAIN_S + 10)
        exited = time.monotonic() - signalled
        assert exited < DRAIN_S + 3, f"exited {exited:.1f} s after SIGTERM"
        # uvicorn raises the signal again once shut down, so the exit status says SIGTERM.
        assert proxy.process.returncode == -signal.SIGTERM
        output = proxy.output()
        assert "Application shutdown complete" in output, output
        wait_for(lambda: backend.stats()["active"] == 0, 5, "the backend still streams to it")
        assert backend.stats()["streams_cut"] == 1
        assert "Traceback" not in output, output
