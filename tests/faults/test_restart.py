"""What a proxy process keeps in Redis and on disk outlives it: a new process, started
after the first was stopped, serves the cached answer and the corpus as they were."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from conftest import free_port, start_redis, write_policy
from fault_helpers import Responder, Served, chat

CACHED = """
rules:
  - name: cached
    stages: [{use: cache}]
"""
KEY = {"authorization": "Bearer sk-restart-tenant"}
DOCUMENTS = {
    "documents": [
        {
            "id": "lighthouse",
            "text": "The Bell Rock Lighthouse was designed by Robert Stevenson. "
            "It stands off the coast of Angus, Scotland.",
            "metadata": {"title": "Bell Rock"},
        },
        {
            "id": "bread",
            "text": "A sourdough starter is flour and water fermented by wild yeast.",
            "metadata": {"title": "Baking"},
        },
    ]
}
QUERY = {"query": "Who designed the Bell Rock Lighthouse?", "top_k": 2}


@pytest.mark.timeout(120)
def test_a_cached_answer_and_a_corpus_outlive_the_proxy_process(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis_port = free_port()
    redis_process = start_redis(redis_port, tmp_path / "redis")
    policy = write_policy(tmp_path, CACHED)
    question = chat("What is kept?", temperature=0, responder={"text": "Kept across restarts."})
    try:
        with Responder(free_port()) as backend:
            args = ["--backend-url", backend.url, "--policy", str(policy)]
            args += ["--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
            env = {"LEANGATE_CORPUS_DIR": str(tmp_path / "corpora")}

            def serve(name: str) -> Served:
                return Served(free_port(), args, tmp_path / f"{name}.log", env)

            with serve("first") as first:
                answered = httpx.post(
                    f"{first.url}/v1/chat/completions", json=question, headers=KEY
                )
                assert answered.headers["x-leangate-cache"] == "miss"
                corpus = f"{first.url}/v1/corpora/handbook"
                added = httpx.post(f"{corpus}/documents", json=DOCUMENTS, headers=KEY, timeout=60)
                assert added.status_code == 200, added.text
                found = httpx.post(f"{corpus}/query", json=QUERY, headers=KEY, timeout=60).json()
                assert found["data"][0]["document"] == "lighthouse"
                listed = httpx.get(f"{first.url}/v1/corpora", headers=KEY).json()
                first.stop()
                assert first.process.returncode == -signal.SIGTERM

            with serve("second") as second:
                completions = f"{second.url}/v1/chat/completions"
                again = httpx.post(completions, json=question, headers=KEY)
                assert again.headers["x-leangate-cache"] == "hit-exact"
                # The same id and creation time: the first process's answer, from Redis.
                assert again.json() == answered.json()
                corpus = f"{second.url}/v1/corpora/handbook"
                assert httpx.get(f"{second.url}/v1/corpora", headers=KEY).json() == listed
                assert listed["data"] == [{"name": "handbook", "documents": 2, "chunks": 2}]
                same = httpx.post(f"{corpus}/query", json=QUERY, headers=KEY, timeout=60).json()
                assert same == found
    finally:
        redis_process.kill()
        redis_process.wait()
