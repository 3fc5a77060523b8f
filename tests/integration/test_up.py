"""`leangate up`, the command behind the README's `scripts/run.sh`, end to end."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_up_shows_every_stage_at_work(vllm_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # the proxy never imports the openai package (only the SDK does): it starts lighter
    without_openai = (
        "import sys; sys.modules['openai'] = None; from leangate.cli import main; main()"
    )
    command = [sys.executable, "-c", without_openai, "up", "--once", "--port", str(port)]
    done = subprocess.run(
        [*command, "--backend-url", vllm_url], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "[first request]" in done.stdout and "cache: miss" in done.stdout
    assert "[second request]" in done.stdout and "cache: hit-exact" in done.stdout
    assert "[with documents]" in done.stdout and "rag: selected;" in done.stdout
    cited = done.stdout.split("cited: ")[1].split("\n")[0].split(", ")
    assert "ferries#0" in cited
    pasted = done.stdout.split("[pasted document]")[1].split("[with documents]")[0]
    assert "compress: compressed;" in pasted and "prompt tokens" in pasted
    planned = done.stdout.split("[planner]")[1]
    assert "plan: sot; reason=request-sot" in planned
