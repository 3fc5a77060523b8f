"""``leangate up``: the bundled vLLM backend, the proxy in front of it, and a first request.

This is the one command a new user runs: it shows the proxy working end to end (the second,
identical request comes back from the cache) and then keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import uvicorn

from leangate.middleware.app import create_app
from leangate.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--backend-url", action="append", help="use this backend, not local vLLM")
    parser.add_argument("--redis-url", help="share the cache through Redis (default: in-process)")
    parser.add_argument("--policy", help="policy YAML file (default: exact result cache)")
    parser.add_argument("--once", action="store_true", help="stop after the demo request")


def run(args: argparse.Namespace) -> int:
    local = None
    urls = args.backend_url
    if not urls:
        from leangate.backend.localvllm import LocalVLLM

        local = LocalVLLM()
        urls = [local.start()]
    try:
        settings = Settings(
            host=args.host,
            port=args.port,
            backend_url=",".join(urls),
            redis_url=args.redis_url,
            policy=args.policy,
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
    """Two identical requests through the proxy: the second is a cache hit. Plain httpx
    (a dependency of leangate), so that ``leangate up`` runs without the dev extras."""
    import httpx

    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    base = f"http://{settings.host}:{settings.port}/v1"
    question = "In one sentence, what is a cache?"
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            model = client.get("/models").raise_for_status().json()["data"][0]["id"]
            for attempt in ("first", "second"):
                started = time.perf_counter()
                response = client.post(
                    "/chat/completions",
                    json={
                        "model": model,
                        "messages": [{"role": "user", "content": question}],
                        "max_tokens": 48,
                        "temperature": 0,
                    },
                ).raise_for_status()
                answer = response.json()["choices"][0]["message"]["content"]
                took = (time.perf_counter() - started) * 1000
                cache = response.headers.get("x-leangate-cache", "-")
                print(
                    f"[{attempt} request] {took:.1f} ms, cache: {cache}\n"
                    f"  Q: {question}\n  A: {answer}"
                )
        outcome.append(True)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        print(f"the demo request failed: {exc}", file=sys.stderr)
        outcome.append(False)
    if once:
        server.should_exit = True
    else:
        print(f"\nleangate is serving at {base} (Ctrl-C to stop). Point your OpenAI client there.")
