"""``leangate up``: the bundled vLLM backend, the proxy in front of it, and a first request.

This is the one command a new user runs: it shows every stage at work on a few requests (the
second, identical request comes back from the cache; a long pasted handbook is cut to the
sentences the question needs; a question with documents attached gets only the chunks that
answer it; a list-like question is answered by Skeleton-of-Thought), prints what each
saved, and then keeps serving until Ctrl-C.
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

from leangate.bench.common import header_fields
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
# leangate up's default: an exact result cache, compression of pasted documents, RAG
# context selection (it acts only on requests that bring documents), and Skeleton-of-Thought
# when a request asks for it. The stages take milliseconds, but where vLLM runs on the same
# cores (as `leangate up` starts it) its busy threads can starve them, so the demo gives
# them budgets of seconds rather than their defaults.
rules:
  - name: demo
    stages:
      - {use: cache}
      - {use: compress, budget_ms: 5000}
      - {use: rag, settings: {select_budget_ms: 5000}}
      - {use: sot, budget_ms: 5000}
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


HANDBOOK_TOWNS = ("Varell", "Quillon", "Tessaro", "Mardin", "Oskel", "Pelto", "Runa", "Sable")


def demo_handbook() -> str:
    """A pasted travel handbook of about 1,500 tokens: long enough for compression to pay."""
    sections = []
    for n, town in enumerate(HANDBOOK_TOWNS):
        sections.append(
            f"## {town}\n"
            f"{town} lies {n + 3} leagues north of the coast road. "
            f"Its old bridge was rebuilt in the year {1700 + 13 * n}. "
            f"The town council meets on the {n + 1}th day of each month. "
            f"Visitors praise its bakeries, which open at {n % 4 + 5} in the morning. "
            f"The museum of {town} keeps a collection of {40 + 7 * n} painted maps. "
            f"A night watch walks the walls of {town} from dusk until the bells at midnight. "
            f"Its river floods in spring, and the lower streets close for {n + 2} weeks. "
            f"The inn by the east gate of {town} has {n + 8} rooms and a stable for twelve horses."
        )
    sections[0] += (
        " The Varell ferry leaves the harbour at noon and reaches Quillon at three. "
        "Ferry tickets cost four crowns at the harbour kiosk."
    )
    return "\n\n".join(sections)


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
    """A few requests through the proxy, each showing one stage and what it saved. Plain
    httpx, not the openai package: the proxy's process never imports it."""
    import httpx

    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    base = f"http://{settings.host}:{settings.port}/v1"
    try:
        with httpx.Client(base_url=base, timeout=300) as client:
            model = client.get("/models").raise_for_status().json()["data"][0]["id"]
            for label, question, options, max_tokens in _demo_requests():
                _ask(client, label, model, question, options, max_tokens)
        outcome.append(True)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        print(f"the demo request failed: {exc}", file=sys.stderr)
        outcome.append(False)
    if once:
        server.should_exit = True
    else:
        print(f"\nleangate is serving at {base} (Ctrl-C to stop). Point your OpenAI client there.")


def _demo_requests() -> list[tuple[str, str, dict[str, Any], int]]:
    """(label, user message, leangate options, max_tokens) of each demo request."""
    cache_question = "In one sentence, what is a cache?"
    pasted = (
        "Answer from the travel handbook below.\n\n"
        f"{demo_handbook()}\n\n"
        "When does the Varell ferry leave, and what do tickets cost?"
    )
    return [
        ("[first request]", cache_question, {}, 48),
        ("[second request]", cache_question, {}, 48),
        ("[pasted document]", pasted, {}, 48),
        (
            "[with documents]",
            "When does the Varell ferry leave, and what do tickets cost?",
            {"documents": DEMO_DOCUMENTS},
            48,
        ),
        (
            "[planner]",
            "What are some tips for keeping a small kitchen tidy?",
            {"planner": "sot"},
            160,
        ),
    ]


def _ask(
    client: Any, label: str, model: str, question: str, options: dict[str, Any], max_tokens: int
) -> None:
    """One request, and what leangate did with it (from its response headers)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if options:
        body["leangate"] = options
    started = time.perf_counter()
    response = client.post("/chat/completions", json=body).raise_for_status()
    answer = response.json()["choices"][0]["message"]["content"]
    took = (time.perf_counter() - started) * 1000
    shown = (
        question
        if len(question) < 200
        else f"({len(question):,} characters) ...{question[-60:].strip()}"
    )
    print(f"{label} {took:.1f} ms")
    for line in describe(response.headers):
        print(f"  {line}")
    print(f"  Q: {shown}\n  A: {answer.strip()}")


STAGE_HEADERS = {
    "cache": "x-leangate-cache",
    "compress": "x-leangate-compress",
    "rag": "x-leangate-rag",
    "cited": "x-leangate-citations",
    "plan": "x-leangate-plan",
}


def describe(headers: Any) -> list[str]:
    """What each stage did (its header) and, where it cut the prompt, the tokens it saved."""
    lines = []
    for name, header in STAGE_HEADERS.items():
        value = headers.get(header)
        if value is None:
            continue
        lines.append(f"{name}: {value}")
        fields = header_fields(value)
        if "tokens_before" in fields and "tokens_after" in fields:
            saved = int(fields["tokens_before"]) - int(fields["tokens_after"])
            if saved > 0:
                lines.append(f"  saved {saved:,} of {int(fields['tokens_before']):,} prompt tokens")
    return lines
