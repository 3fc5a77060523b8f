"""The ``rag`` stage's selection and its request rewriting, in process: chunking, the
budget, placement, citations, the marked block, and failing open with nothing lost."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from recording_backend import RecordingBackend, chat_context, services_of

from leangate.backend.client import BackendClient, BackendSettings
from leangate.cache.embedder import Embedder
from leangate.cache.keys import exact_hash
from leangate.middleware.context import JsonResult, RequestContext
from leangate.middleware.endpoint import forward
from leangate.middleware.metrics import Metrics
from leangate.middleware.pipeline import build_chain
from leangate.middleware.protocol import RequestOptions
from leangate.retrieval import rag
from leangate.retrieval.chunks import chunk_document
from leangate.retrieval.documents import Document
from leangate.retrieval.evidence import Piece, Pool
from leangate.retrieval.rag import (
    CITATIONS_HEADER,
    HEADER,
    EmbeddingMemory,
    RagSettings,
    RagStage,
    TokenCounts,
    given_pieces,
    select_evidence,
)

# Invented documents: the answer needs the bridge from the first to the second.
DOCS = [
    Document(
        id="harbor",
        text=(
            "The Quillon Lighthouse stands on the northern cape of Varell Island. "
            "It was designed by the engineer Odile Brant in 1884. "
            "Its lamp was converted to electricity in 1931."
        ),
        metadata={"title": "Quillon Lighthouse"},
    ),
    Document(
        id="brant",
        text=(
            "Odile Brant was a French civil engineer. "
            "She was born in the town of Sarlenne in 1849. "
            "Brant also designed three bridges over the Loire."
        ),
        metadata={"title": "Odile Brant"},
    ),
    *[
        Document(
            id=f"filler-{n}",
            text=" ".join(
                f"The {kind} market of Tessaro {n} sells {item} every {day}."
                for kind, item, day in (
                    ("morning", "bread", "Monday"),
                    ("evening", "fish", "Tuesday"),
                    ("weekend", "cheese", "Saturday"),
                    ("winter", "wool", "Sunday"),
                )
            ),
            metadata={"title": f"Tessaro {n}"},
        )
        for n in range(6)
    ],
]
QUESTION = "In which town was the designer of the Quillon Lighthouse born?"


def rough(text: str) -> int:
    return max(1, round(len(text) / 4))


def test_chunks_keep_sentences_whole_and_paragraphs_apart() -> None:
    text = "# Guide\nFirst one here. Second one here.\n\nThird is alone."
    chunks = chunk_document("g", text, max_tokens=5)
    assert [c.id for c in chunks] == ["g#0", "g#1", "g#2"]
    assert [c.text for c in chunks] == ["First one here.", "Second one here.", "Third is alone."]
    assert all(c.title == "Guide" for c in chunks)
    assert [c.paragraph for c in chunks] == [0, 0, 1]
    assert text[chunks[2].start : chunks[2].end] == chunks[2].text


def test_selection_finds_the_bridge_within_the_budget() -> None:
    pool = Pool(given_pieces(DOCS, None, TokenCounts(rough)), rough)
    evidence, reason = select_evidence(QUESTION, pool, RagSettings(ratio=4))
    assert reason == "selected"
    assert evidence.tokens <= round(pool.tokens / 4)
    assert "designed by the engineer Odile Brant" in evidence.text
    assert "born in the town of Sarlenne" in evidence.text
    assert {"harbor", "brant"} <= {p.chunk.doc_id for p in evidence.cited}


def test_strongest_evidence_goes_last_and_chunks_are_headed_by_their_titles() -> None:
    pool = Pool(given_pieces(DOCS, None, TokenCounts(rough)), rough)
    last, _ = select_evidence(QUESTION, pool, RagSettings(ratio=4))
    first, _ = select_evidence(QUESTION, pool, RagSettings(ratio=4, order="strongest-first"))
    assert last.text.startswith("## ") and "## Quillon Lighthouse\nThe Quillon" in last.text
    assert last.cited[-1].chunk.doc_id in ("harbor", "brant")
    assert first.cited[0].chunk.id == last.cited[-1].chunk.id
    assert {p.chunk.id for p in first.cited} == {p.chunk.id for p in last.cited}


def test_ids_head_the_chunks_when_the_model_should_cite_them() -> None:
    pool = Pool(given_pieces(DOCS, None, TokenCounts(rough)), rough, with_ids=True)
    evidence, _ = select_evidence(QUESTION, pool, RagSettings(ratio=4))
    assert "[harbor#0] Quillon Lighthouse\nThe Quillon" in evidence.text
    assert evidence.tokens <= round(pool.tokens / 4)


def test_a_step_keeps_the_clients_question_evidence_beside_its_own() -> None:
    """An off-the-point sub-question (a small decomposer's) still gets the evidence of the
    question it was made for, in ``anchor_share`` of the budget; with no share it does not."""
    pool = Pool(given_pieces(DOCS, None, TokenCounts(rough)), rough)
    step = "What does the weekend market of Tessaro 2 sell?"
    plain, _ = select_evidence(step, pool, RagSettings(ratio=4, anchor_share=0))
    anchored, _ = select_evidence(step, pool, RagSettings(ratio=4), anchor=QUESTION)
    assert "Odile Brant" not in plain.text
    assert "designed by the engineer Odile Brant" in anchored.text
    assert "weekend market of Tessaro 2 sells cheese" in anchored.text
    assert anchored.tokens <= round(pool.tokens / 4)


def test_the_anchor_is_the_clients_question_and_only_for_a_sub_request() -> None:
    client = BackendClient(BackendSettings(urls=["http://unused"]))
    parent = chat_context(client, QUESTION)
    step = parent.derive({"messages": [{"role": "user", "content": "Who designed it?"}]})
    same = parent.derive({"messages": [{"role": "user", "content": QUESTION}]})
    assert rag._anchor_question(step, "Who designed it?") == QUESTION
    assert rag._anchor_question(same, QUESTION) is None
    assert rag._anchor_question(parent, QUESTION) is None


def test_a_context_within_the_budget_is_sent_whole() -> None:
    pool = Pool(given_pieces(DOCS[:2], None, TokenCounts(rough)), rough)
    evidence, reason = select_evidence(QUESTION, pool, RagSettings(budget_tokens=10_000))
    assert reason == "within-budget"
    assert evidence.tokens <= pool.tokens
    assert all(sentence in evidence.text for d in DOCS[:2] for sentence in d.text.split(". "))


def test_corpus_priors_weigh_in() -> None:
    """Two chunks equal to BM25: the one the corpus search ranked higher wins."""
    a = chunk_document("a", "Zeta pumps move water uphill.")[0]
    b = chunk_document("b", "Zeta pumps move water downhill.")[0]
    pool = Pool([Piece(a, "docs", prior=0.1), Piece(b, "docs", prior=0.9)], rough)
    evidence, _ = select_evidence("zeta pumps water", pool, RagSettings(budget_tokens=14))
    assert [p.chunk.id for p in evidence.cited] == ["b#0"]


# --- the stage in a chain ----------------------------------------------------------------------


async def _chain(settings: RagSettings) -> tuple[Any, RecordingBackend, Metrics]:
    backend = RecordingBackend()
    client = await backend.client()
    services = services_of(client)
    stage = RagStage("rag", settings, services)
    return build_chain([(stage, 1.0)], forward, services.metrics), backend, services.metrics


def _ctx(content: str, **options: Any) -> RequestContext:
    client = BackendClient(BackendSettings(urls=["http://unused"]))
    return chat_context(client, content, options=RequestOptions(**options), max_tokens=4)


@pytest.mark.asyncio
async def test_attached_documents_reach_the_model_selected_and_cited() -> None:
    chain, backend, metrics = await _chain(RagSettings(ratio=4))
    ctx = _ctx(QUESTION, documents=DOCS, citations=True)
    result = await _run(chain, ctx, backend)
    sent = backend.bodies[-1]["messages"][-1]["content"]
    assert sent.endswith(QUESTION)
    assert "born in the town of Sarlenne" in sent and "Tessaro 3" not in sent
    assert ctx.response_headers[HEADER].startswith("selected; chunks=")
    assert "tokens_before=" in ctx.response_headers[HEADER]
    cited_ids = ctx.response_headers[CITATIONS_HEADER].split(", ")
    assert {"harbor#0", "brant#0"} <= set(cited_ids)
    assert isinstance(result, JsonResult)
    cited = result.json()["leangate"]["citations"]
    assert [c["id"] for c in cited] == cited_ids
    titles = {c["document"]: c["title"] for c in cited}
    assert titles["harbor"] == "Quillon Lighthouse" and titles["brant"] == "Odile Brant"
    rendered = metrics.render().decode()
    assert 'leangate_rag_selections_total{outcome="selected",stage="rag"} 1.0' in rendered
    saved = re.search(r'leangate_stage_saved_seconds_total\{stage="rag"\} ([0-9.e-]+)', rendered)
    assert saved is not None and float(saved.group(1)) > 0


@pytest.mark.asyncio
async def test_a_marked_block_is_selected_in_place() -> None:
    chain, backend, _ = await _chain(RagSettings(ratio=4))
    block = "\n\n".join(f"## {d.metadata['title']}\n{d.text}" for d in DOCS)
    ctx = _ctx(f"Read this.\n<context>\n{block}\n</context>\n{QUESTION}")
    await _run(chain, ctx, backend)
    sent = backend.bodies[-1]["messages"][-1]["content"]
    assert sent.startswith("Read this.\n<context>\n## ")
    assert sent.endswith(f"</context>\n{QUESTION}")
    assert "Sarlenne" in sent and "Tessaro 3" not in sent


@pytest.mark.asyncio
async def test_a_failing_selection_sends_the_given_documents_whole(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("selection broke")

    monkeypatch.setattr(rag, "select_evidence", broken)
    chain, backend, metrics = await _chain(RagSettings(ratio=4))
    ctx = _ctx(QUESTION, documents=DOCS)
    await _run(chain, ctx, backend)
    sent = backend.bodies[-1]["messages"][-1]["content"]
    assert all(d.text.split(". ")[0] in sent for d in DOCS)
    assert ctx.response_headers[HEADER].startswith("failed-open-error;")
    assert caplog.records, "the failure is logged"
    assert "Quillon" not in caplog.text and "Sarlenne" not in caplog.text, "no prompt text"
    assert 'leangate_stage_failed_open_total{reason="error",stage="rag"} 1.0' in (
        metrics.render().decode()
    )


@pytest.mark.asyncio
async def test_requests_without_context_pass_untouched() -> None:
    chain, backend, _ = await _chain(RagSettings())
    ctx = _ctx(QUESTION)
    await _run(chain, ctx, backend)
    assert backend.bodies[-1]["messages"][-1]["content"] == QUESTION
    assert HEADER not in ctx.response_headers


def test_attached_documents_are_part_of_the_cache_key() -> None:
    plain = _ctx(QUESTION)
    with_docs = _ctx(QUESTION, documents=DOCS[:1])
    other_docs = _ctx(QUESTION, documents=DOCS[1:2])
    cited = _ctx(QUESTION, documents=DOCS[:1], citations=True)
    hashes = {exact_hash(c) for c in (plain, with_docs, other_docs, cited)}
    assert len(hashes) == 4


async def _run(chain: Any, ctx: RequestContext, backend: RecordingBackend) -> Any:
    ctx.backend = client = await backend.client()
    try:
        return await chain(ctx)
    finally:
        await ctx.scope.aclose()
        await client.aclose()


@pytest.mark.asyncio
async def test_selection_that_would_not_pay_sends_the_context_whole() -> None:
    """Until the profile is calibrated, a 20-second selection per 1,000 tokens cannot pay
    for the prefill of a few hundred tokens: the documents go whole."""
    chain, backend, _ = await _chain(RagSettings(ratio=4, prior_ms_per_1k=20_000))
    ctx = _ctx(QUESTION, documents=DOCS)
    await _run(chain, ctx, backend)
    sent = backend.bodies[-1]["messages"][-1]["content"]
    assert all(d.text.split(". ")[0] in sent for d in DOCS)
    assert ctx.response_headers[HEADER].startswith("no-gain-uncalibrated;")
    forced, backend, _ = await _chain(RagSettings(ratio=4, prior_ms_per_1k=20_000, mode="always"))
    ctx = _ctx(QUESTION, documents=DOCS)
    await _run(forced, ctx, backend)
    assert ctx.response_headers[HEADER].startswith("selected;")


def test_the_stage_needs_the_tokenizer_and_for_auto_the_profile() -> None:
    assert RagStage.needs_for(RagSettings()) == {"tokenizer", "profile"}
    assert RagStage.needs_for(RagSettings(mode="always", corpora=["kb"])) == {
        "tokenizer",
        "embedder",
    }


def test_a_paragraph_cut_into_chunks_is_written_once_under_one_head() -> None:
    text = " ".join(f"The Varell ferry stop number {n} has a bench." for n in range(80))
    doc = Document(id="stops", text=text, metadata={"title": "Ferry stops"})
    pool = Pool(given_pieces([doc], None, TokenCounts(rough)), rough, with_ids=True)
    assert len({p.chunk.id for p in pool.pieces}) > 1, "the paragraph makes several chunks"
    evidence, _ = select_evidence("Varell ferry bench", pool, RagSettings(budget_tokens=10_000))
    ids = ", ".join(p.chunk.id for p in pool.pieces)
    assert evidence.text.startswith(f"[{ids}] Ferry stops\nThe Varell ferry stop number 0")
    assert evidence.text.count("Ferry stops") == 1


@pytest.mark.asyncio
async def test_embeddings_are_remembered_per_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = Embedder()
    embedded: list[str] = []
    real = embedder.aembed

    async def counting(texts: Any) -> Any:
        embedded.extend(texts)
        return await real(texts)

    monkeypatch.setattr(embedder, "aembed", counting)
    memory = EmbeddingMemory(embedder, 100)
    try:
        first = await memory.embed("a", ["one sentence", "another one"])
        again = await memory.embed("a", ["another one", "one sentence"])
        await memory.embed("b", ["one sentence"])
    finally:
        embedder.close()
    assert embedded == ["one sentence", "another one", "one sentence"], "b embeds its own"
    assert (again[1] == first[0]).all() and (again[0] == first[1]).all()
