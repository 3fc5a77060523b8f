"""``leangate up``: the bundled vLLM backend, the proxy in front of it, and a first request.

This is the one command a new user runs: it shows the proxy working end to end (the second,
identical request comes back from the cache; a question with documents attached gets only
the sentences that answer it) and then keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from leangate.middleware.app import create_app
from leangate.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--backend-url", action="append", help="use this backend, not local vLLM")
    parser.add_argument("--redis-url", help="share the cache through Redis (default: in-process)")
    parser.add_argument(
        "--policy", help="policy YAML file (default: the exact result cache, then RAG)"
    )
    parser.add_argument("--once", action="store_true", help="stop after the demo request")


DEMO_POLICY = """
# leangate up's default: an exact result cache, then RAG context selection (it acts only
# on requests that bring documents). Selection takes a few ms, but where vLLM runs on the
# same cores (as `leangate up` starts it) its busy threads can starve it, so the demo
# gives it a budget of seconds rather than the default 400 ms.
rules:
  - name: demo
    stages: [{use: cache}, {use: rag, settings: {select_budget_ms: 5000}}]
"""
DEMO_DOCUMENTS = [
    {
        "id": "ferries",
        "text": "The Varell ferry leaves the harbour at noon. It reaches Quillon at three. "
        "Tickets cost four crowns at the harbour kiosk.",
        "metadata": {"title": "Varell ferry"},
    },
    *[
        {
            "id": f"market-{n}",
            "text": f"The market of Tessaro {n} sells bread on Mondays. It sells fish on "
            f"Tuesdays. Its cheese stall opens on Saturdays. Wool is sold in winter.",
            "metadata": {"title": f"Tessaro {n}"},
        }
        for n in range(6)
    ],
]


def run(args: argparse.Namespace) -> int:
    local = None
    urls = args.backend_url
    if not urls:
        from leangate.backend.localvllm import LocalVLLM

        local = LocalVLLM()
        urls = [local.start()]
    try:
        with tempfile.TemporaryDirectory() as folder:
            policy = args.policy
            if policy is None:
                policy = Path(folder) / "demo-policy.yaml"
                policy.write_text(DEMO_POLICY)
            settings = Settings(
                host=args.host,
                port=args.port,
                backend_url=",".join(urls),
                redis_url=args.redis_url,
                policy=policy,
            )
            return _serve_with_demo(settings, once=args.once)
    finally:
        if local is not None:
            local.stop()


def _serve_with_demo(settings: Settings, *, once: bool) -> int:
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level="warning"
    )
    server = uvicorn.Server(config)
    outcome: list[bool] = []
    demo = threading.Thread(target=_demo, args=(server, settings, once, outcome), daemon=True)
    demo.start()
    server.run()
    demo.join(timeout=5)
    return 0 if outcome == [True] else 1


def _demo(server: uvicorn.Server, settings: Settings, once: bool, outcome: list[bool]) -> None:
    """Two identical requests through the proxy (the second is a cache hit), then one with
    documents attached (RAG sends only what answers it). Plain httpx, not the openai
    package: the proxy's process never imports it."""
    import httpx

    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    base = f"http://{settings.host}:{settings.port}/v1"
    try:
        with httpx.Client(base_url=base, timeout=300) as client:
            model = client.get("/models").raise_for_status().json()["data"][0]["id"]
            question = "In one sentence, what is a cache?"
            for attempt in ("first", "second"):
                _ask(client, f"[{attempt} request]", model, question, {})
            _ask(
                client,
                "[with documents]",
                model,
                "When does the Varell ferry leave, and what do tickets cost?",
                {"documents": DEMO_DOCUMENTS},
            )
        outcome.append(True)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        print(f"the demo request failed: {exc}", file=sys.stderr)
        outcome.append(False)
    if once:
        server.should_exit = True
    else:
        print(f"\nleangate is serving at {base} (Ctrl-C to stop). Point your OpenAI client there.")


def _ask(client: Any, label: str, model: str, question: str, options: dict[str, Any]) -> None:
    """One request, and what leangate did with it (from its response headers)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 48,
        "temperature": 0,
    }
    if options:
        body["leangate"] = options
    started = time.perf_counter()
    response = client.post("/chat/completions", json=body).raise_for_status()
    answer = response.json()["choices"][0]["message"]["content"]
    took = (time.perf_counter() - started) * 1000
    did = [f"cache: {response.headers.get('x-leangate-cache', '-')}"]
    if "x-leangate-rag" in response.headers:
        did.append(f"rag: {response.headers['x-leangate-rag']}")
        did.append(f"cited: {response.headers.get('x-leangate-citations', '')}")
    print(f"{label} {took:.1f} ms, {'; '.join(did)}\n  Q: {question}\n  A: {answer}")
