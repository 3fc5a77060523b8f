"""``leangate bench rag``: context selection's quality, cost and end-to-end speed.

1. *quality* on ``<data-dir>/hotpotqa/dev_distractor_20.json``, each record's 10
   paragraphs attached as documents (title in the metadata), selected by the ``rag``
   stage's own code at its default settings (ratio 4). ``supporting_fact_recall``: gold
   supporting sentences that reach the prompt intact; ``both_gold_recall``: records where
   both gold paragraphs reach it (at least one supporting sentence of each);
   ``token_reduction``: context tokens of all 10 paragraphs over those sent (median), the
   served model's tokenizer. Figures for the tune part (``_tune``: what the selection was
   designed and tuned on) and the held-out part (``_holdout``, and the unsuffixed ones);
   the split is by a hash of ``_id`` (``bench/hotpot.py``).
2. *latency*, in process, on the same requests: ``select_p50_ms`` chunking, token counts
   and selection at the default settings (lexical; nothing cached between requests);
   ``select_cached_p50_ms`` the same with dense scores on, the documents' embeddings
   already in the stage's memory (the documents were seen before);
   ``select_dense_cold_p50_ms`` dense on, nothing cached.
3. *corpus*: a top-10 hybrid query against a 100k-chunk corpus, after the query
   embedding (``bench/rag_corpus.py``; most of its vectors are synthetic, it says so).
4. *end to end* on the real backend, ``max_tokens`` 32 (``ignore_eos``), temperature 0, a
   nonce first in every prompt so that vLLM's prefix cache cannot hit: the full context
   sent direct to vLLM against the documents attached through a proxy running the
   ``rag`` stage, arms alternating, the first record a warm-up; medians.
   ``e2e_latency_ratio``: full-context time over selected-context time;
   ``cost_share_of_prefill_saved``: the stage's own time over the time it saved;
   ``e2e_answer_match_full`` / ``_selected``: answers containing the gold answer.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.localvllm import MODEL_NAME
from leangate.backend.tokenizer import Tokenizer
from leangate.retrieval.corpora import Corpora, CorpusSettings
from leangate.retrieval.documents import Document
from leangate.retrieval.evidence import Pool
from leangate.retrieval.rag import (
    HEADER,
    EmbeddingMemory,
    Query,
    RagSettings,
    TokenCounts,
    dense_inputs,
    given_pieces,
    search_corpus,
    select_evidence,
)

from . import hotpot
from .common import (
    BenchError,
    add_common_arguments,
    backend_urls,
    header_fields,
    log,
    machine_info,
    rounded,
    spawn_proxy,
    tokenizer_env,
    tokens_counter,
)

MODEL = MODEL_NAME
POLICY = """
rules:
  - name: rag
    stages:
      - use: rag
"""
TENANT = "bench"
Count = Callable[[str], int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--parts", default="quality,latency,corpus,e2e")
    parser.add_argument("--records", type=int, default=None, help="end-to-end records")
    parser.add_argument("--corpus-chunks", type=int, default=100_000)


def run(args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    count, tokenizer_dir = tokens_counter()
    result: dict[str, object] = {"benchmark": "rag", "quick": bool(args.quick)}
    result["tokens_counted_with"] = str(tokenizer_dir) if tokenizer_dir else "chars/4 estimate"
    path = args.data_dir / hotpot.FILE
    records = hotpot.load(args.data_dir) if path.is_file() else []
    if not records:
        result["missing_data"] = [str(path)]
        log(f"{path} is missing: no quality, latency or end-to-end figures")
    parts = set(args.parts.split(","))
    if "quality" in parts and records:
        result.update(quality(records, count))
    if "latency" in parts and records:
        result.update(asyncio.run(_latency(records, count, quick=args.quick)))
    if "corpus" in parts and records:
        result.update(asyncio.run(corpus_quality(records, count)))
    if "corpus" in parts:
        result.update(_corpus(args))
    if "e2e" in parts and records:
        with backend_urls(args) as urls:
            result.update(_e2e(urls, records, count, args, tokenizer_dir))
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_info()
    return result


def documents(record: hotpot.Record) -> list[Document]:
    return [
        Document(id=f"p{n}", text=" ".join(s.strip() for s in sents), metadata={"title": title})
        for n, (title, sents) in enumerate(record.paragraphs)
    ]


def select(
    record: hotpot.Record, count: Count, settings: RagSettings
) -> tuple[str, int, int, float]:
    """The context the stage sends for ``record``: its text and tokens, the tokens of all
    10 paragraphs as a full-context prompt carries them, and the stage's milliseconds
    (chunking, token counts, selection)."""
    started = time.perf_counter()
    memo = _stage_counts(count)
    pool = Pool(given_pieces(documents(record), None, memo), memo)
    evidence, _ = select_evidence(record.question, pool, settings)
    took = (time.perf_counter() - started) * 1000
    return evidence.text, count(hotpot.document(record.paragraphs)), evidence.tokens, took


def _stage_counts(count: Count) -> TokenCounts:
    """The stage's own token counting (batched, remembered per request) with the served
    model's tokenizer when its folder is here, else ``count``."""
    tokenizer = _tokenizer()
    return TokenCounts(count) if tokenizer is None else TokenCounts.of(tokenizer, MODEL)


@functools.cache
def _tokenizer() -> Tokenizer | None:
    folder = tokens_counter()[1]
    if folder is None:
        return None
    return Tokenizer(BackendClient(BackendSettings(urls=["http://unused"])), {MODEL: folder})


# --- quality -----------------------------------------------------------------------------------


def quality(records: Sequence[hotpot.Record], count: Count) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, part in (
        ("tune", [r for r in records if r.tune]),
        ("holdout", [r for r in records if not r.tune]),
    ):
        kept = total = both = 0
        reductions = []
        for record in part:
            text, before, after, _ = select(record, count, RagSettings())
            kept += sum(s in text for s in record.supporting)
            total += len(record.supporting)
            both += _both_gold(record, text)
            reductions.append(before / max(after, 1))
        out[f"supporting_fact_recall_{name}"] = rounded(kept / total, 3) if total else None
        out[f"both_gold_recall_{name}"] = rounded(both / len(part), 3) if part else None
        out[f"token_reduction_{name}"] = rounded(statistics.median(reductions), 2) if part else None
        out[f"records_{name}"] = len(part)
    for figure in ("supporting_fact_recall", "both_gold_recall", "token_reduction"):
        out[figure] = out[f"{figure}_holdout"]
    return out


def _both_gold(record: hotpot.Record, text: str) -> bool:
    by_title: dict[str, bool] = {}
    for title, sentences in record.paragraphs:
        for sentence in sentences:
            if sentence.strip() in record.supporting:
                by_title[title] = by_title.get(title, False) or sentence.strip() in text
    return len(by_title) >= 2 and all(by_title.values())


# --- latency -----------------------------------------------------------------------------------


async def _latency(
    records: Sequence[hotpot.Record], count: Count, *, quick: bool
) -> dict[str, object]:
    from leangate.cache.embedder import Embedder

    rounds = 2 if quick else 5
    lexical = [select(r, count, RagSettings())[3] for r in list(records) * rounds]
    embedder = Embedder()
    await asyncio.to_thread(embedder.load)
    try:
        dense_settings = RagSettings(dense=True)
        cold, cached = [], []
        for record in records:
            memory = EmbeddingMemory(embedder, 20_000)
            cold.append(await _timed_dense(record, count, dense_settings, memory))
            for _ in range(rounds):
                cached.append(await _timed_dense(record, count, dense_settings, memory))
    finally:
        embedder.close()
    return {
        "select_p50_ms": rounded(statistics.median(lexical), 2),
        "select_cached_p50_ms": rounded(statistics.median(cached), 2),
        "select_dense_cold_p50_ms": rounded(statistics.median(cold), 2),
    }


async def _timed_dense(
    record: hotpot.Record, count: Count, settings: RagSettings, memory: EmbeddingMemory
) -> float:
    """The stage's dense path: chunk, count, embed (or recall) and select."""
    started = time.perf_counter()
    memo = _stage_counts(count)
    pool = Pool(given_pieces(documents(record), None, memo), memo)
    indices, texts = dense_inputs(pool)
    vectors = await memory.embed(TENANT, [record.question, *texts])
    dense = (indices, [float(v) for v in vectors[1:] @ vectors[0]])
    select_evidence(record.question, pool, settings, dense)
    return (time.perf_counter() - started) * 1000


# --- corpus ------------------------------------------------------------------------------------


async def corpus_quality(records: Sequence[hotpot.Record], count: Count) -> dict[str, object]:
    """Every record's paragraphs in one corpus (``corpus_paragraphs``, deduplicated by
    title); each question searched there by the stage's own corpus search and selection
    at its default settings. A harder task than attached documents: the distractors of
    all 20 questions compete."""
    from leangate.cache.embedder import Embedder

    embedder = Embedder()
    await asyncio.to_thread(embedder.load)
    with tempfile.TemporaryDirectory() as folder:
        corpora = Corpora(CorpusSettings(root=Path(folder)), embedder, None)
        await corpora.start()
        try:
            titles = {title: sents for r in records for title, sents in r.paragraphs}
            docs = [
                Document(id=f"t{n}", text=" ".join(s.strip() for s in sents), metadata={"title": t})
                for n, (t, sents) in enumerate(titles.items())
            ]
            await corpora.add(TENANT, "hotpot", docs)
            settings = RagSettings(corpora=["hotpot"])
            rows = []
            for record in records:
                vector = (await embedder.aembed([record.question]))[0]
                query = Query(TENANT, "hotpot", record.question, vector)
                pieces = await search_corpus(corpora, embedder, query, settings)
                counts = _stage_counts(count)
                evidence, _ = select_evidence(record.question, Pool(pieces, counts), settings)
                rows.append((record, evidence))
        finally:
            await corpora.aclose()
            embedder.close()
    out: dict[str, object] = {"corpus_paragraphs": len(docs)}
    for name, tune in (("tune", True), ("holdout", False)):
        part = [(r, e) for r, e in rows if r.tune == tune]
        kept = sum(s in e.text for r, e in part for s in r.supporting)
        total = sum(len(r.supporting) for r, _ in part)
        out[f"corpus_supporting_fact_recall_{name}"] = rounded(kept / total, 3) if total else None
        out[f"corpus_both_gold_recall_{name}"] = (
            rounded(sum(_both_gold(r, e.text) for r, e in part) / len(part), 3) if part else None
        )
    out["corpus_context_tokens_median"] = statistics.median(e.tokens for _, e in rows)
    return out


def _corpus(args: argparse.Namespace) -> dict[str, object]:
    from leangate.cache.embedder import Embedder

    from .rag_corpus import corpus_query_figures

    embedder = Embedder()
    embedder.load()
    try:
        figures = corpus_query_figures(embedder, chunks=args.corpus_chunks, quick=args.quick)
    finally:
        embedder.close()
    return dict(figures)


# --- end to end --------------------------------------------------------------------------------


def _e2e(
    urls: list[str],
    records: list[hotpot.Record],
    count: Count,
    args: argparse.Namespace,
    tokenizer_dir: Path | None,
) -> dict[str, object]:
    n = args.records or (4 if args.quick else len(records) - 1)
    chosen = random.Random(args.seed).sample(records, min(n + 1, len(records)))
    with tempfile.TemporaryDirectory() as folder:
        policy = Path(folder) / "rag.yaml"
        policy.write_text(POLICY)
        env = tokenizer_env(tokenizer_dir)
        with spawn_proxy(urls, policy=policy, env=env) as proxy, httpx.Client(timeout=900) as http:
            rows = []
            for index, record in enumerate(chosen):
                row = _pair(http, urls[0], proxy.url, record, count, args, index)
                if index:  # the first record is the warm-up
                    rows.append(row)
    return _e2e_figures(rows)


def _pair(
    http: httpx.Client,
    direct: str,
    proxy: str,
    record: hotpot.Record,
    count: Count,
    args: argparse.Namespace,
    index: int,
) -> dict[str, Any]:
    arms = ["full", "selected"]
    if index % 2:
        arms.reverse()
    row: dict[str, Any] = {}
    for arm in arms:
        nonce = f"Request {uuid.uuid4().hex[:12]}. "
        if arm == "full":
            content = nonce + hotpot.prompt(record)
            row["tokens"] = count(content)
            took, answer, headers = _ask(http, direct, content, None, args.max_tokens)
        else:
            content = f"{nonce}{hotpot.INSTRUCTION}\n\nQuestion: {record.question}"
            took, answer, headers = _ask(http, proxy, content, record, args.max_tokens)
            row["header"] = header_fields(headers.get(HEADER, ""))
        row[arm] = took
        row[f"{arm}_match"] = _matches(answer, record.answer)
    log(
        f"record {index}: {row['tokens']} tokens; full {row['full']:.2f}s, selected "
        f"{row['selected']:.2f}s; {row['header']}"
    )
    return row


def _ask(
    http: httpx.Client,
    url: str,
    content: str,
    record: hotpot.Record | None,
    max_tokens: int,
) -> tuple[float, str, httpx.Headers]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if record is not None:
        body["leangate"] = {"documents": [d.model_dump() for d in documents(record)]}
    started = time.perf_counter()
    response = http.post(f"{url}/v1/chat/completions", json=body)
    took = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"{url}: {response.status_code} {response.text[:300]}")
    answer = str(response.json()["choices"][0]["message"]["content"] or "")
    return took, answer, response.headers


def _matches(answer: str, gold: str) -> bool:
    def norm(text: str) -> str:
        return " ".join(re.findall(r"[a-z0-9]+", text.lower()))

    return f" {norm(gold)} " in f" {norm(answer)} "


def _e2e_figures(rows: list[dict[str, Any]]) -> dict[str, object]:
    if not rows:
        return {}
    stage_s = [float(r["header"].get("ms", 0)) / 1000 for r in rows]
    saved = [r["full"] - (r["selected"] - s) for r, s in zip(rows, stage_s, strict=True)]
    return {
        "e2e_latency_ratio": rounded(statistics.median(r["full"] / r["selected"] for r in rows), 3),
        "cost_share_of_prefill_saved": rounded(sum(stage_s) / sum(saved), 4)
        if sum(saved) > 0
        else None,
        "e2e_full_s_median": rounded(statistics.median(r["full"] for r in rows), 3),
        "e2e_selected_s_median": rounded(statistics.median(r["selected"] for r in rows), 3),
        "e2e_stage_ms_median": rounded(statistics.median(stage_s) * 1000, 1),
        "e2e_prompt_tokens_median": statistics.median(r["tokens"] for r in rows),
        "e2e_answer_match_full": rounded(sum(r["full_match"] for r in rows) / len(rows), 3),
        "e2e_answer_match_selected": rounded(sum(r["selected_match"] for r in rows) / len(rows), 3),
        "e2e_records": len(rows),
    }
