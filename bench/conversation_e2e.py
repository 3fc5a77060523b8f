"""The *end to end* part of ``leangate bench conversation`` (3. in ``bench/conversation.py``'s
docstring): each conversation driven turn by turn direct to vLLM and through a proxy whose
backend is a ``Relay`` (which keeps what the proxy sends), vLLM's prefix-cache counters read
around every request, and the figures from both arms' ``TurnRow``s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from leangate.retrieval.compress import HEADER, CompressSettings
from leangate.retrieval.summarize import SUMMARY_INSTRUCTIONS

from .common import (
    BenchError,
    free_port,
    header_fields,
    log,
    rounded,
    spawn_proxy,
    tokenizer_env,
    tokens_counter,
)
from .conversation_data import (
    FROM_TURN,
    MODEL,
    SYSTEM,
    TURNS,
    Conversation,
    Rewrites,
    TurnRow,
    facts_in_prompt,
)


class Relay:
    """Between the proxy and vLLM: forwards every request (streams as they come) and keeps
    each chat request's body and its answer's usage, so the bench sees what the proxy sent."""

    def __init__(self, backend: str) -> None:
        self.backend = backend.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sent: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def taken(self) -> list[dict[str, Any]]:
        """The chat requests sent since the last call."""
        with self._lock:
            out, self.sent = self.sent, []
        return out

    def __enter__(self) -> Relay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        url = self.backend + request.path_qs
        async with self._session.request(
            request.method, url, data=body or None, headers=headers
        ) as up:
            kind = up.headers.get("content-type", "application/json")
            if "text/event-stream" in kind:
                out = web.StreamResponse(status=up.status, headers={"content-type": kind})
                await out.prepare(request)
                async for chunk in up.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
            data = await up.read()
        if request.path.endswith("/chat/completions") and body:
            self._keep(body, data)
        return web.Response(body=data, status=up.status, headers={"content-type": kind})

    def _keep(self, body: bytes, answer: bytes) -> None:
        try:
            usage = json.loads(answer).get("usage") or {}
        except (ValueError, AttributeError):
            usage = {}
        with self._lock:
            self.sent.append(
                {"body": json.loads(body), "prompt_tokens": int(usage.get("prompt_tokens") or 0)}
            )


def _counters(url: str) -> tuple[float, float]:
    """vLLM's prefix-cache counters: (queried tokens, hit tokens)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    totals = {"vllm:prefix_cache_queries_total": 0.0, "vllm:prefix_cache_hits_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:prefix_cache_queries_total"], totals["vllm:prefix_cache_hits_total"]


def e2e(
    url: str,
    conversations: list[Conversation],
    args: argparse.Namespace,
    settings: CompressSettings,
    tokenizer_dir: Path | None,
) -> dict[str, object]:
    policy = {
        "rules": [
            {
                "name": "compress",
                "stages": [
                    {
                        "use": "compress",
                        "budget_ms": 5000,
                        "settings": settings.model_dump(exclude_defaults=True),
                    }
                ],
            }
        ]
    }
    tenant_key = f"bench-{uuid.uuid4().hex}"  # a tenant of its own: no form of an earlier run
    rows: dict[str, list[TurnRow]] = {"direct": [], "leangate": []}
    rewrites: list[tuple[bool, int, int, int, int]] = []
    count, _ = tokens_counter()
    with tempfile.TemporaryDirectory() as folder, Relay(url) as relay:
        path = Path(folder) / "conversation.yaml"
        path.write_text(json.dumps(policy))
        env = tokenizer_env(tokenizer_dir)
        with (
            spawn_proxy([relay.url], policy=path, env=env) as proxy,
            httpx.Client(timeout=900) as http,
        ):
            _wait_calibrated(http, proxy.url, tenant_key)
            for number, conversation in enumerate(conversations):
                arms = [("direct", url), ("leangate", proxy.url)]
                if number % 2:
                    arms.reverse()
                drive = _Drive(
                    http, relay, conversation, arms, args.max_tokens, tenant_key, count, settings
                )
                for turn in range(1, TURNS + 1):
                    drive.turn(turn)
                for name in rows:
                    rows[name] += drive.rows[name]
                rewrites.append((conversation.tune, *drive.rewrites.figures(2 * TURNS - 1)))
    return _e2e_figures(rows, rewrites)


class _Drive:
    """One conversation driven turn by turn through both arms."""

    def __init__(
        self,
        http: httpx.Client,
        relay: Relay,
        conversation: Conversation,
        arms: list[tuple[str, str]],
        max_tokens: int,
        tenant_key: str,
        count: Callable[[str], int],
        settings: CompressSettings,
    ) -> None:
        self.http, self.relay, self.conversation, self.arms = http, relay, conversation, arms
        self.max_tokens, self.tenant_key, self.count = max_tokens, tenant_key, count
        self.systems = {name: SYSTEM.format(nonce=uuid.uuid4().hex[:12]) for name, _ in arms}
        self.transcript: list[dict[str, Any]] = []
        self.rows: dict[str, list[TurnRow]] = {name: [] for name, _ in arms}
        self.rewrites = Rewrites(settings.min_turn_tokens, count)

    def turn(self, turn: int) -> None:
        user = {"role": "user", "content": self.conversation.turns[turn - 1]}
        answers: dict[str, str] = {}
        for name, url in self.arms:
            messages = [{"role": "system", "content": self.systems[name]}, *self.transcript, user]
            answers[name] = self._ask(name, url, turn, messages)
        self.transcript += [user, {"role": "assistant", "content": answers["direct"]}]

    def _ask(self, name: str, url: str, turn: int, messages: list[dict[str, Any]]) -> str:
        body = {
            "model": MODEL,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        headers = {"authorization": f"Bearer {self.tenant_key}"}
        self.relay.taken()
        queried, hit = _counters(url if name == "direct" else self.relay.backend)
        started = time.perf_counter()
        response = self.http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise BenchError(f"{name} turn {turn}: {response.status_code} {response.text[:300]}")
        queried2, hit2 = _counters(url if name == "direct" else self.relay.backend)
        answer = response.json()
        text = str(answer["choices"][0]["message"].get("content") or "")
        tokens = int(answer["usage"]["prompt_tokens"])
        row = TurnRow(self.conversation.id, self.conversation.tune, turn, seconds=seconds)
        row.hits, row.queries, row.after = hit2 - hit, queried2 - queried, tokens
        expected = tokens
        if name == "leangate":
            taken = self.relay.taken()
            expected = sum(t["prompt_tokens"] for t in taken)
            main = [t["body"] for t in taken if not _is_summary(t["body"])]
            if main:
                sent = main[-1]["messages"]
                row.facts_kept, row.facts = facts_in_prompt(self.conversation, turn, sent)
                self.rewrites.see(messages, sent)
            row.header = header_fields(response.headers.get(HEADER, ""))
            row.summaries_new = sum(_is_summary(t["body"]) for t in taken)
        row.contaminated = abs(row.queries - expected) > 0
        fact = self.conversation.recall.get(turn)
        row.recalled = None if fact is None else fact.number in text
        self.rows[name].append(row)
        log(
            f"{self.conversation.id[:17]} turn {turn} {name}: {tokens} tokens, hits {row.hits:.0f}/"
            f"{row.queries:.0f}{' (other traffic)' if row.contaminated else ''}, {seconds:.2f}s "
            f"{response.headers.get(HEADER, '')}"
        )
        return text


def _is_summary(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    first = str(messages[0].get("content") or "") if messages else ""
    return first.startswith(SUMMARY_INSTRUCTIONS[:40])


def _wait_calibrated(http: httpx.Client, url: str, tenant_key: str) -> None:
    """Wait for the proxy's backend profile (calibrated in the background at start-up), so
    that the cost check runs on measured speeds."""
    sample = " ".join(
        f"Line {i} of a calibration note about harbours and boats." for i in range(160)
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        body = {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": f"{uuid.uuid4().hex}\n\n{sample}\n\nWhich line is first?",
                }
            ],
            "max_tokens": 1,
        }
        response = http.post(
            f"{url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {tenant_key}w"},
        )
        if response.status_code == 200 and "uncalibrated" not in response.headers.get(HEADER, ""):
            return
        time.sleep(2)
    raise BenchError("the proxy's backend profile did not calibrate within 300 s")


Pair = tuple[TurnRow, TurnRow]
"""One turn: the direct arm's request and the proxy arm's."""


def _e2e_figures(
    rows: dict[str, list[TurnRow]], rewrites: list[tuple[bool, int, int, int, int]]
) -> dict[str, object]:
    pairs = list(zip(rows["direct"], rows["leangate"], strict=True))
    late = [(d, g) for d, g in pairs if d.turn >= FROM_TURN]
    clean = [(d, g) for d, g in late if not d.contaminated and not g.contaminated]
    figures: dict[str, object] = {
        "e2e_conversations": len({d.conversation for d, _ in pairs}),
        "e2e_contaminated_turns": len(late) - len(clean),
    }
    for suffix, part in (("", None), ("_tune", True), ("_holdout", False)):
        mine = [(d, g) for d, g in late if part is None or d.tune is part]
        figures.update(_prompt_figures(mine, suffix))
        figures.update(_hit_figures([p for p in mine if p in clean], suffix))
    if late:
        figures["e2e_latency_ratio_median"] = rounded(
            statistics.median(d.seconds / g.seconds for d, g in late), 3
        )
    for name, arm in rows.items():
        asked = [r for r in arm if r.recalled is not None]
        if asked:
            figures[f"e2e_fact_recall_answers_{name}"] = rounded(
                sum(bool(r.recalled) for r in asked) / len(asked), 3
            )
    figures["e2e_llm_summary_calls"] = sum(g.summaries_new for _, g in pairs)
    summarized = sum(w[4] for w in rewrites)
    figures["e2e_summary_calls_per_old_turn"] = (
        rounded(sum(w[3] for w in rewrites) / summarized, 3) if summarized else None
    )
    figures["e2e_old_turn_rewrites_per_turn"] = rounded(
        sum(w[1] for w in rewrites) / max(sum(w[2] for w in rewrites), 1), 3
    )
    figures["e2e_hit_rate_by_turn"] = {
        str(t): [_rate([r for r in rows[arm] if r.turn == t]) for arm in ("direct", "leangate")]
        for t in range(1, TURNS + 1)
    }
    log(f"end to end: {figures}")
    return figures


def _rate(rows: Sequence[TurnRow]) -> float:
    """vLLM's prefix-cache hit rate over ``rows``: hit tokens over queried tokens."""
    return rounded(sum(r.hits for r in rows) / max(sum(r.queries for r in rows), 1), 3)


def _hit_figures(pairs: list[Pair], suffix: str) -> dict[str, object]:
    if not pairs:
        return {}
    direct, proxy = _rate([d for d, _ in pairs]), _rate([g for _, g in pairs])
    return {
        f"e2e_hit_rate_direct{suffix}": direct,
        f"e2e_hit_rate_leangate{suffix}": proxy,
        f"prefix_cache_hit_ratio{suffix}": rounded(proxy / direct, 3) if direct else None,
    }


def _prompt_figures(pairs: list[Pair], suffix: str) -> dict[str, object]:
    """vLLM's prompt tokens, direct over proxy, and the planted facts the proxy sent."""
    if not pairs:
        return {}
    return {
        f"e2e_conversation_token_reduction{suffix}": rounded(
            sum(d.after for d, _ in pairs) / sum(g.after for _, g in pairs), 3
        ),
        f"e2e_conversation_token_reduction_min{suffix}": rounded(
            min(d.after / g.after for d, g in pairs), 3
        ),
        f"e2e_planted_fact_retention{suffix}": rounded(
            sum(g.facts_kept for _, g in pairs) / max(sum(g.facts for _, g in pairs), 1), 3
        ),
    }
