"""What the fault tests share: the benchmark responder and ``leangate serve`` as processes
that can be killed, restarted and signalled, and request bodies that pace the answer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from conftest import MODEL

TEXT = "Hello from the benchmark responder."
"""The responder's answer when a request names no text of its own."""


def cycled(chunks: int) -> str:
    """The text of an answer paced as ``{"chunks": chunks}``: the words cycled."""
    words = TEXT.split(" ")
    return " ".join(words[i % len(words)] for i in range(chunks))


def chat(content: str, *, responder: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A chat request; ``responder`` paces the answer (see ``bench/responder.py``)."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    if responder is not None:
        body["responder"] = responder
    return {**body, **fields}


def events(text: str) -> list[str]:
    """A stream's SSE events, ``data: `` taken off."""
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]


def streamed_text(payloads: list[str]) -> str:
    """The content of a whole chat stream (``payloads`` without ``[DONE]``)."""
    chunks = [json.loads(p) for p in payloads]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def wait_listening(port: int, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert process.poll() is None, f"the process exited with {process.returncode}"
        assert time.monotonic() < deadline, f"nothing listens on port {port}"
        time.sleep(0.05)


def refused(port: int) -> bool:
    """Whether a new connection to ``port`` is refused."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


class Responder:
    """``python -m leangate.bench.responder`` on a fixed port: killed with SIGKILL (as a
    crashed backend host), started again on the same port."""

    def __init__(self, port: int, *extra: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._command = [
            sys.executable,
            "-m",
            "leangate.bench.responder",
            "--port",
            str(port),
            "--model",
            MODEL,
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Responder:
        self.process = subprocess.Popen(self._command, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.process, 15)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = httpx.get(self.url + "/stats", timeout=5).json()
        return stats

    def __enter__(self) -> Responder:
        try:
            return self.start()
        except BaseException:
            self.kill()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


class Served:
    """``python -m leangate serve`` as its own process, its output kept in ``log``."""

    def __init__(
        self, port: int, args: list[str], log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        command = [sys.executable, "-m", "leangate", "serve", "--port", str(port), *args]
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LEANGATE_LOG_LEVEL": "info", **(env or {})},
            )

    def wait_ready(self, seconds: float = 60) -> Served:
        deadline = time.monotonic() + seconds
        while True:
            assert self.process.poll() is None, f"leangate serve exited:\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"leangate serve never got ready:\n{self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there 30 s later (a failed test's)."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> Served:
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
