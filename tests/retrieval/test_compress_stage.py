"""The ``compress`` stage in a chain, against a scripted backend: what is sent, what is
skipped, the cost check, and failing open."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import numpy as np
import pytest
from compress_corpus import GOLD, prompt
from recording_backend import ANSWER, RecordingBackend, chat_context, services_of

from leangate.backend.client import BackendClient
from leangate.backend.profile import Estimate
from leangate.cache.embedder import Embedder
from leangate.middleware.context import RequestContext
from leangate.middleware.endpoint import forward
from leangate.middleware.metrics import Metrics
from leangate.middleware.pipeline import build_chain
from leangate.middleware.registry import stage_class
from leangate.retrieval import compress
from leangate.retrieval.compress import HEADER, CompressSettings, CompressStage


async def _setup(
    **settings: Any,
) -> tuple[CompressStage, BackendClient, RecordingBackend, Metrics]:
    backend = RecordingBackend(max_model_len=3000)
    client = await backend.client()
    services = services_of(client)
    options = {"min_prompt_tokens": 50, "min_block_tokens": 40, **settings}
    return (
        CompressStage("compress", CompressSettings(**options), services),
        client,
        backend,
        services.metrics,
    )


def _ctx(client: BackendClient, messages: list[dict[str, Any]], **extra: Any) -> RequestContext:
    return chat_context(client, messages, **extra)


def _long(repeat: int = 3) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": prompt(repeat=repeat)},
    ]


def _metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_the_stage_is_registered() -> None:
    assert stage_class("compress") is CompressStage
    assert CompressStage.needs_for(CompressSettings()) == {"profile", "tokenizer"}
    assert CompressStage.needs_for(CompressSettings(dense=True, mode="always")) == {
        "embedder",
        "tokenizer",
    }
    with pytest.raises(ValueError):
        CompressSettings.model_validate({"ratio": 4, "unknown": 1})


async def test_a_long_prompt_is_compressed_and_reported() -> None:
    stage, client, backend, metrics = await _setup(mode="always", ratio=3.0)
    ctx = _ctx(client, _long())
    original = json.loads(json.dumps(ctx.body))
    await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    sent = backend.bodies[-1]["messages"]
    assert sent[0] == original["messages"][0], "the system prompt is never altered"
    assert len(sent[1]["content"]) < len(original["messages"][1]["content"]) / 2
    assert all(g in sent[1]["content"] for g in GOLD)
    assert original == json.loads(json.dumps(original)), "the client's body is not mutated"
    header = ctx.response_headers[HEADER]
    assert header.startswith("compressed; reason=policy-always; method=dedup+bm25+hop;")
    fields = dict(p.split("=") for p in header.split("; ")[1:])
    assert 2.7 <= int(fields["tokens_before"]) / int(fields["tokens_after"]) <= 3.3
    assert _metric(metrics, "leangate_compress_tokens_total", stage="compress", kind="before") > 0
    assert _metric(metrics, "leangate_compress_seconds_count", stage="compress") == 1
    assert stage.cost.ms_per_1k != CompressSettings().prior_ms_per_1k, "its own time is measured"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Short question?"}],
        [{"role": "user", "content": [{"type": "text", "text": prompt(repeat=3)}]}],
        [
            {"role": "user", "content": prompt(repeat=3)},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "1"},
            {"role": "user", "content": "And then?"},
        ],
    ],
    ids=["short", "content-parts", "tool-calls"],
)
async def test_other_requests_pass_through_untouched(messages: list[dict[str, Any]]) -> None:
    stage, client, backend, metrics = await _setup(mode="always")
    ctx = _ctx(client, messages)
    raw = json.dumps(ctx.body)
    await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    assert backend.bodies[-1] == json.loads(raw)


async def test_a_prompt_over_the_context_window_passes_through() -> None:
    stage, client, backend, metrics = await _setup(mode="always")
    ctx = _ctx(client, _long(repeat=12))
    await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    assert ctx.response_headers[HEADER].startswith("skipped; reason=over-context;")
    assert backend.bodies[-1]["messages"] == _long(repeat=12)


async def test_a_request_with_tools_passes_through() -> None:
    stage, client, backend, metrics = await _setup(mode="always")
    ctx = _ctx(client, _long(), tools=[{"type": "function", "function": {"name": "f"}}])
    await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    assert backend.bodies[-1]["messages"] == _long()


async def test_it_skips_when_the_saving_does_not_pay() -> None:
    stage, client, backend, metrics = await _setup()
    profile = stage.services.profile
    profile.calibrated = True
    profile.estimate = Estimate(0.05, 1e7, 0.04, 0.005, 0.0)  # a backend with instant prefill
    ctx = _ctx(client, _long())
    await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    assert ctx.response_headers[HEADER].startswith("skipped; reason=no-gain;")
    assert backend.bodies[-1]["messages"] == _long()
    profile.estimate = Estimate(0.05, 500.0, 0.04, 0.005, 0.0)  # a slow one
    ctx = _ctx(client, _long())
    await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    assert ctx.response_headers[HEADER].startswith("compressed; reason=pays;")
    assert (
        _metric(
            metrics,
            "leangate_compress_decisions_total",
            stage="compress",
            decision="skip",
            reason="no-gain",
        )
        == 1
    )


async def test_uncalibrated_it_uses_the_conservative_rule() -> None:
    stage, client, _, metrics = await _setup(uncalibrated_prefill_tps=1e9)
    ctx = _ctx(client, _long())
    await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    assert ctx.response_headers[HEADER].startswith("skipped; reason=no-gain-uncalibrated;")


async def test_an_error_fails_open(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, client, backend, metrics = await _setup(mode="always")

    def broken(*args: object) -> None:
        raise RuntimeError("selector broke")

    monkeypatch.setattr(compress, "rebuild", broken)
    ctx = _ctx(client, _long())
    result = await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    assert result.json() == ANSWER  # type: ignore[union-attr]
    assert backend.bodies[-1]["messages"] == _long()
    assert (
        _metric(metrics, "leangate_stage_failed_open_total", stage="compress", reason="error") == 1
    )


async def test_overrunning_its_budget_fails_open(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, client, backend, metrics = await _setup(mode="always")
    slow_choose = stage._choose

    def slow(*args: Any) -> Any:
        import time

        time.sleep(0.2)
        return slow_choose(*args)

    monkeypatch.setattr(stage, "_choose", slow)
    ctx = _ctx(client, _long())
    await build_chain([(stage, 0.05)], forward, metrics)(ctx)
    assert backend.bodies[-1]["messages"] == _long()
    assert len(backend.bodies) == 1
    assert (
        _metric(metrics, "leangate_stage_failed_open_total", stage="compress", reason="timeout")
        == 1
    )
    await asyncio.sleep(0.2)  # the abandoned worker thread finishes


class _Embedder:
    """Scores by word overlap: enough to see dense scores change the choice."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def aembed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(texts)
        vectors = np.array([[float("Castleby" in t), 1.0] for t in texts], dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors


async def test_dense_scores_come_from_the_shared_embedder() -> None:
    stage, client, _, metrics = await _setup(mode="always", dense=True, dense_candidates=5)
    fake = _Embedder()
    stage.services.embedder = cast(Embedder, fake)
    ctx = _ctx(client, _long())
    await build_chain([(stage, 1.0)], forward, metrics)(ctx)
    assert "+dense+" in ctx.response_headers[HEADER]
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 6  # the question and 5 sentences
