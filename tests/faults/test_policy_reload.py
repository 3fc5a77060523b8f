"""A policy file that goes bad while the proxy runs: the last good policy stays in force,
and the proxy says why, in its log and in ``/metrics``; a file caught half-written is not
applied.

``tests/middleware/test_policy.py::test_watcher_reloads_and_keeps_the_old_policy_on_error``
checks the watcher alone (its callback and ``last_error``); this checks the running proxy:
what its requests get, the log line and the reload counter, for each way a file goes bad.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import NO_STAGES, ProxyThread, free_port, proxy_settings, wait_for, write_policy
from fault_helpers import Responder, chat

from leangate.bench.common import metric_total

CACHED = """
rules:
  - name: cached
    stages: [{use: cache}]
"""
BROKEN = {
    "not YAML": ("rules: [{name: cached", "not valid YAML"),
    "an unknown key": (
        "rules:\n  - name: cached\n    stages: [{use: cache}]\n    oops: 1\n",
        "rules.0.oops",
    ),
    "bad stage settings": (
        "rules:\n  - name: cached\n    stages: [{use: cache, settings: {ttl_s: -5}}]\n",
        "ttl_s",
    ),
    "no file": (None, "cannot read"),
}


def _reloads(proxy: ProxyThread, outcome: str) -> float:
    return metric_total(proxy.url, f'leangate_policy_reloads_total{{outcome="{outcome}"}}')


def _counted(proxy: ProxyThread, outcome: str, times: int) -> Callable[[], bool]:
    return lambda: _reloads(proxy, outcome) == times


@pytest.mark.timeout(60)
def test_a_broken_policy_file_keeps_the_last_good_policy_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_policy(tmp_path, CACHED)
    with Responder(free_port()) as backend:
        settings = proxy_settings(backend.url, policy=path, policy_reload_s=0.1)
        with ProxyThread(settings) as proxy:
            url = proxy.url + "/v1/chat/completions"

            def cache_header() -> str | None:
                answer = httpx.post(url, json=chat("Hello?", temperature=0), timeout=10)
                assert answer.status_code == 200, answer.text
                header: str | None = answer.headers.get("x-leangate-cache")
                return header

            assert cache_header() in {"miss", "hit-exact"}
            for rejected, (what, (text, reason)) in enumerate(BROKEN.items(), start=1):
                caplog.clear()
                time.sleep(0.02)  # a new modification time, whatever the file system's grain
                if text is None:
                    path.unlink()
                else:
                    path.write_text(text)
                counted = f"the reload of {what} was not counted as rejected"
                wait_for(_counted(proxy, "rejected", rejected), 10, counted)
                said = [r for r in caplog.records if r.levelno >= logging.ERROR]
                assert said and "keeping the previous policy" in said[-1].getMessage()
                assert reason in said[-1].getMessage(), f"{what}: the log says why"
                assert cache_header() == "hit-exact", f"{what}: the last good policy holds"
            assert _reloads(proxy, "applied") == 0

            path.write_text(NO_STAGES)
            wait_for(_counted(proxy, "applied", 1), 10, "a good file was not applied")
            assert cache_header() is None, "the new policy runs no stage"


LOCKED = """rules:
  - name: plain
    stages: []
require_api_key: true
tenants: {acme: {api_keys: [sk-acme]}}
"""


@pytest.mark.timeout(60)
def test_a_policy_file_written_in_place_is_not_applied_half_written(tmp_path: Path) -> None:
    """An editor or a tool that writes the file in place leaves it truncated for a moment;
    the first lines of a policy are often a valid policy of their own (here: one without
    the key requirement). The watcher waits for the file to settle."""
    path = write_policy(tmp_path, CACHED)
    with Responder(free_port()) as backend:
        settings = proxy_settings(backend.url, policy=path, policy_reload_s=0.1)
        with ProxyThread(settings) as proxy:
            url = proxy.url + "/v1/chat/completions"
            with path.open("w") as writing:  # truncates, as editors and `cat >` do
                writing.write(LOCKED[: LOCKED.index("require_api_key")])
                writing.flush()
                time.sleep(0.3)  # three reload ticks
                assert _reloads(proxy, "applied") == 0, "a half-written policy was applied"
                writing.write(LOCKED[LOCKED.index("require_api_key") :])
            wait_for(_counted(proxy, "applied", 1), 10, "the whole file was not applied")
            assert httpx.post(url, json=chat("Hello?"), timeout=10).status_code == 401
            keyed = {"authorization": "Bearer sk-acme"}
            assert (
                httpx.post(url, json=chat("Hello?"), headers=keyed, timeout=10).status_code == 200
            )
            assert _reloads(proxy, "applied") == 1 and _reloads(proxy, "rejected") == 0
