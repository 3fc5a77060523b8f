"""The SDK against the real vLLM server and Redis: the result cache, streams, RAG with
attached documents, the synchronous twin, and the admin client against a running proxy."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from conftest import MODEL, ProxyThread, proxy_settings, write_policy
from prometheus_client.parser import text_string_to_metric_families

import leangate
from leangate import Document, Options, Pipeline

pytestmark = pytest.mark.integration

POLICY = """
rules:
  - name: grounded
    stages:
      - use: cache
      - use: rag
        budget_ms: 30000
        settings: {ratio: 4, select_budget_ms: 30000}
"""
GOLD = Document(
    id="lighthouse",
    text="The Quillon Lighthouse was painted green in 1931 by the keeper Ansel Moro.",
    metadata={"title": "Quillon Lighthouse"},
)
FILLER = [
    Document(
        id=f"market-{n}",
        text=" ".join(
            f"The {kind} market of Tessaro {n} sells {item} on {day}s."
            for kind, item, day in (
                ("morning", "bread", "Monday"),
                ("evening", "fish", "Tuesday"),
                ("weekend", "cheese", "Saturday"),
            )
        ),
    )
    for n in range(6)
]


def _question(text: str) -> list[dict[str, str]]:
    """A question no earlier run has cached."""
    return [{"role": "user", "content": f"{text} ({uuid.uuid4().hex[:8]})"}]


def _backend_requests(lg: Pipeline) -> float:
    families = text_string_to_metric_families(lg.metrics.render().decode())
    family = next(f for f in families if f.name == "leangate_backend_requests")
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


@pytest.fixture(scope="module")
async def lg(vllm_url: str, redis_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline([vllm_url], POLICY, redis_url=redis_url) as pipeline:
        yield pipeline


async def test_a_repeated_chat_is_a_cache_hit(lg: Pipeline) -> None:
    messages = _question("Name a colour.")
    ask: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
    first = await lg.chat.completions.with_raw_response.create(**ask)
    assert first.headers["x-leangate-cache"] == "miss"
    await asyncio.sleep(0.2)  # the answer is stored in the background
    sent = _backend_requests(lg)
    second = await lg.chat.completions.with_raw_response.create(**ask)
    assert second.headers["x-leangate-cache"] == "hit-exact"
    assert _backend_requests(lg) == sent
    answer = second.parse()
    assert isinstance(answer, openai.types.chat.ChatCompletion)
    assert answer.choices[0].message.content == first.parse().choices[0].message.content


async def test_a_repeated_stream_is_a_cache_hit(lg: Pipeline) -> None:
    ask: dict[str, Any] = {
        "model": MODEL,
        "messages": _question("Say hello."),
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
    }
    texts, outcomes = [], []
    for _ in range(2):
        stream = await lg.chat.completions.create(**ask)
        chunks = [chunk async for chunk in stream]
        assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
        texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        outcomes.append(stream.headers["x-leangate-cache"])
        await asyncio.sleep(0.2)
    assert outcomes == ["miss", "hit-exact"]
    assert texts[0] and texts[0] == texts[1]


async def test_closing_a_stream_early_cancels_the_backend_request(
    lg: Pipeline, vllm_url: str
) -> None:
    assert await _settles_at_zero(vllm_url, 60), "vLLM is busy with another test's requests"
    stream = await lg.chat.completions.create(
        model=MODEL,
        messages=_question("Count to one thousand."),
        max_tokens=1500,
        extra_body={"ignore_eos": True},
        stream=True,
    )
    async for _ in stream:
        break
    assert await _running(vllm_url) >= 1
    await stream.close()
    assert await _settles_at_zero(vllm_url, 10), "vLLM generates on for a closed stream"


async def _settles_at_zero(vllm_url: str, within_s: float) -> bool:
    """Whether vLLM runs no request within ``within_s`` (its gauge follows its steps)."""
    for _ in range(int(within_s * 10)):
        if await _running(vllm_url) == 0:
            return True
        await asyncio.sleep(0.1)
    return await _running(vllm_url) == 0


async def _running(vllm_url: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(vllm_url + "/metrics")).text
    families = text_string_to_metric_families(text)
    running = next(f for f in families if f.name == "vllm:num_requests_running")
    return sum(s.value for s in running.samples)


async def test_rag_with_attached_documents_cites_them(lg: Pipeline) -> None:
    raw = await lg.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=_question("What colour was the Quillon Lighthouse painted in 1931?"),
        max_tokens=4,
        temperature=0,
        leangate=Options(documents=[*FILLER[:3], GOLD, *FILLER[3:]], citations=True),
    )
    cited = raw.headers["x-leangate-citations"].split(", ")
    assert "lighthouse#0" in cited
    assert raw.headers["x-leangate-rag"].startswith("selected;")
    extra = raw.parse().model_extra or {}
    assert [c["id"] for c in extra["leangate"]["citations"]] == cited


async def test_errors_are_the_openai_clients(lg: Pipeline) -> None:
    with pytest.raises(openai.NotFoundError):
        await lg.chat.completions.create(model="no-such-model", messages=_question("Hi"))
    with pytest.raises(openai.BadRequestError):  # vLLM's own 400, passed through
        await lg.completions.create(model=MODEL, prompt="Hi", max_tokens=10**7)


def test_the_sync_twin(vllm_url: str) -> None:
    pipeline = Pipeline(vllm_url, "rules: [{name: cached, stages: [{use: cache}]}]")
    with pipeline.sync() as lg:
        answer = lg.chat.completions.create(
            model=MODEL, messages=_question("Say yes."), max_tokens=4, temperature=0
        )
        assert isinstance(answer, openai.types.chat.ChatCompletion)
        assert answer.choices[0].finish_reason in {"stop", "length"}
        with lg.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, stream=True) as s:
            chunks = list(s)
        assert chunks and all(isinstance(c, openai.types.Completion) for c in chunks)
        with pytest.raises(openai.NotFoundError):
            lg.chat.completions.create(model="no-such-model", messages=_question("Hi"))


def test_admin_client_against_a_proxy(
    vllm_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("sdk-admin")
    settings = proxy_settings(
        vllm_url, policy=write_policy(root, "rules: []\n"), corpus_dir=root / "corpora"
    )
    corpus = f"handbook-{uuid.uuid4().hex[:8]}"
    with (
        ProxyThread(settings) as proxy,
        leangate.AdminClient(proxy.url, api_key=f"sk-{uuid.uuid4().hex}") as admin,
    ):
        assert admin.health().status == "ok"
        added = admin.add_documents(corpus, [GOLD, *FILLER[:2]])
        assert (added.corpus, added.documents) == (corpus, 3)
        assert leangate.CorpusInfo(name=corpus, documents=3, chunks=added.chunks) in (
            admin.list_corpora()
        )
        hits = admin.query(corpus, "Who painted the Quillon Lighthouse?", top_k=2)
        assert hits[0].document == "lighthouse" and hits[0].id == "lighthouse#0"
        with pytest.raises(leangate.AdminError) as duplicate:
            admin.add_documents(corpus, [GOLD])
        assert duplicate.value.status == 409
        assert admin.delete_documents(corpus, ["market-0"]) == 1
        admin.drop_corpus(corpus)
        assert corpus not in [c.name for c in admin.list_corpora()]
        with pytest.raises(leangate.AdminError) as gone:
            admin.drop_corpus(corpus)
        assert gone.value.status == 404
