"""Shared fixtures: the real vLLM server, the real Redis, and proxies run in a thread.

Integration tests never skip for a missing component: vLLM is started when none is
running (``LEANGATE_TEST_BACKEND_URL`` points at one that is), and a Redis that does not
answer fails the run with a clear message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis
import uvicorn

from leangate.backend.transport import Transport
from leangate.bench.common import metric_total
from leangate.middleware.app import create_app
from leangate.middleware.tracing import Tracing
from leangate.settings import Settings

MODEL = "SmolLM2-135M-Instruct"


def too_long_prompt(backend_url: str) -> str:
    """A prompt longer than the backend's context window (vLLM answers it with a 400)."""
    import httpx

    models = httpx.get(backend_url.rstrip("/") + "/v1/models", timeout=10).json()["data"]
    context = max(int(m.get("max_model_len") or 8192) for m in models)
    return "word " * (context + 100)


@pytest.fixture(scope="session")
def vllm_url() -> Iterator[str]:
    """Base URL (no /v1) of a real vLLM server serving the bundled model."""
    given = os.environ.get("LEANGATE_TEST_BACKEND_URL")
    if given:
        yield given.rstrip("/")
        return
    from leangate.backend.localvllm import LocalVLLM

    server = LocalVLLM()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis at {url} does not answer ({exc}). The test command starts one; "
            "run scripts/test.sh, or start redis-server and set REDIS_URL.",
            pytrace=False,
        )
    finally:
        client.close()
    return url


class ProxyThread:
    """A leangate app served by uvicorn on a free port, in a thread with its own loop."""

    def __init__(
        self,
        settings: Settings,
        transport: Transport | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.app = create_app(settings, transport=transport, tracing=tracing)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> ProxyThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


NO_STAGES = "rules: []\n"


def write_policy(directory: Path, text: str, name: str = "policy.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def proxy_settings(backend_url: str, **overrides: Any) -> Settings:
    return Settings(backend_url=backend_url, **overrides)


@pytest.fixture(scope="session")
def proxy(vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    """A proxy running no stage at all in front of the real vLLM server."""
    policy = write_policy(tmp_path_factory.mktemp("proxy"), NO_STAGES)
    with ProxyThread(proxy_settings(vllm_url, policy=policy)) as running:
        yield running


def backend_requests(proxy: ProxyThread) -> float:
    """How many requests the proxy has sent to its backend, from its /metrics."""
    return metric_total(proxy.url, "leangate_backend_requests_total")


def vllm_running(vllm_url: str) -> float:
    """How many sequences vLLM is generating now (its gauge follows its scheduler steps)."""
    return metric_total(vllm_url, "vllm:num_requests_running")


def wait_for(condition: Callable[[], bool], seconds: float, message: str) -> None:
    """Poll ``condition`` until it holds; fail with ``message`` after ``seconds``.

    Deadlines are generous: a test asserts that something happens, not how fast (a vLLM
    that was just started runs its first batches of a new size slowly)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


@contextlib.contextmanager
def posted_then_left(url: str, body: dict[str, Any]) -> Iterator[None]:
    """POST ``body`` on a raw connection whose answer is never read; leaving the block
    closes the connection, as a client that gave up would."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(head + payload)
        yield


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A private redis-server, for tests that stop and start Redis."""
    server = shutil.which("redis-server")
    assert server, "redis-server is needed for this test (the test command installs it)"
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    raise RuntimeError("private redis-server did not start")
