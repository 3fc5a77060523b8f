"""Corpus figures for ``leangate bench rag``: query latency at scale, ingest rate, fusion.

``corpus_query_figures`` builds one corpus of ``chunks`` chunks in a temporary folder
(sqlite chunk store): a few hundred real texts (HotpotQA paragraphs when the data is there,
else generated sentences) embedded for real, the bulk synthetic (one sentence of Zipf-drawn
words each, with a random unit vector, so the lexical postings have a realistic shape and
nothing costs an embedding). It times ``Corpora.search`` for top-10 with the queries
embedded beforehand: the figures are the corpus's own cost after the query embedding.

``fusion_figures`` compares the two fusions (and each list alone) on HotpotQA: every
paragraph of the sample is a document, every question a query, and a hit is a chunk of one
of the question's two supporting paragraphs.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leangate.cache.embedder import Embedder
from leangate.cache.semantic_eval import default_data_dir
from leangate.retrieval.corpora import Corpora, CorpusSettings
from leangate.retrieval.documents import Document

from . import hotpot
from .common import percentile, rounded

TENANT = "bench"
REAL_TEXTS = 300
SYNTHETIC_WORDS = 50_000
FALLBACK_QUESTIONS = [
    "Which volcano erupted near the town in 1669?",
    "Who directed the film that won the award?",
    "What is the population of the capital city?",
    "When was the university founded?",
]


class _SyntheticEmbedder(Embedder):
    """The real embedder, except for the synthetic texts: a fixed random unit vector each."""

    def __init__(self, real: Embedder, synthetic: set[str], seed: int = 0) -> None:
        super().__init__()
        self.real = real
        self.synthetic = synthetic
        self.rng = np.random.default_rng(seed)
        self.embedded = 0

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        out = self.rng.standard_normal((len(texts), self.real.dim)).astype(np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        real = [i for i, t in enumerate(texts) if t not in self.synthetic]
        if real:
            out[real] = await self.real.aembed([texts[i] for i in real])
            self.embedded += len(real)
        return out


def corpus_query_figures(
    embedder: Embedder, *, chunks: int = 100_000, queries: int = 200, quick: bool = False
) -> dict[str, float | int | str]:
    if quick:
        chunks, queries = min(chunks, 20_000), min(queries, 50)
    return asyncio.run(_query_figures(embedder, chunks, queries))


async def _query_figures(
    embedder: Embedder, chunks: int, queries: int
) -> dict[str, float | int | str]:
    real_docs, questions = _real_material()
    real_docs = real_docs[: max(1, min(REAL_TEXTS, chunks // 10))]
    synthetic = _synthetic_documents(max(0, chunks - len(real_docs)))
    fake = _SyntheticEmbedder(embedder, {d.text for d in synthetic})
    with tempfile.TemporaryDirectory(prefix="leangate-corpus-bench-") as root:
        settings = CorpusSettings(root=Path(root), max_documents_per_request=len(synthetic) + 1)
        corpora = Corpora(settings, fake, None)
        await corpora.start()
        started = time.perf_counter()
        real = await corpora.add(TENANT, "bench", real_docs)
        real_s = time.perf_counter() - started
        if synthetic:
            await corpora.add(TENANT, "bench", synthetic)
        build_s = time.perf_counter() - started
        [info] = await corpora.corpora(TENANT)
        vectors = await embedder.aembed(questions)
        latencies = []
        for i in range(queries + 10):
            j = i % len(questions)
            began = time.perf_counter()
            await corpora.search(TENANT, "bench", questions[j], vectors[j], 10)
            if i >= 10:  # warm-up
                latencies.append((time.perf_counter() - began) * 1000)
        kind = corpora._snapshots[(TENANT, "bench")].kind
        await corpora.aclose()
    return {
        "corpus_query_p50_ms": rounded(percentile(latencies, 50), 3),
        "corpus_query_p95_ms": rounded(percentile(latencies, 95), 3),
        "corpus_chunks": info.chunks,
        "corpus_index": kind,
        "corpus_build_s": rounded(build_s, 2),
        "corpus_ingest_chunks_per_s": rounded(real.chunks / real_s, 1),
        "corpus_note": (
            f"{real.chunks} chunks of {real.documents} real texts embedded with the real "
            f"embedder ({real.chunks / real_s:.0f} chunks/s, the ingest rate); the other "
            f"{info.chunks - real.chunks} synthetic (random words and random unit vectors); "
            "sqlite chunk store; latency of Corpora.search top-10 after the query embedding"
        ),
    }


def _real_material() -> tuple[list[Document], list[str]]:
    path = default_data_dir() / hotpot.FILE
    if not path.is_file():
        docs = [
            Document(id=f"real-{i}", text=f"{q} The answer is recorded in note {i}.")
            for i, q in enumerate(FALLBACK_QUESTIONS * 50)
        ]
        return docs, FALLBACK_QUESTIONS
    records = hotpot.load(default_data_dir())
    return _paragraph_documents(records), [r.question for r in records]


def _paragraph_documents(records: Sequence[hotpot.Record]) -> list[Document]:
    seen: dict[str, Document] = {}
    for record in records:
        for title, sentences in record.paragraphs:
            text = " ".join(s.strip() for s in sentences if s.strip())
            if text and title not in seen:
                seen[title] = Document(
                    id=title.replace("#", " "), text=text, metadata={"title": title}
                )
    return list(seen.values())


def _synthetic_documents(count: int, seed: int = 1) -> list[Document]:
    rng = np.random.default_rng(seed)
    vocabulary = np.asarray([f"w{i}" for i in range(SYNTHETIC_WORDS)])
    ranks = np.minimum(rng.zipf(1.2, size=(count, 40)) - 1, SYNTHETIC_WORDS - 1)
    return [
        Document(id=f"syn-{i}", text=" ".join(vocabulary[row]) + ".") for i, row in enumerate(ranks)
    ]


# --- fusion quality ----------------------------------------------------------------------------


def fusion_figures(embedder: Embedder, data_dir: Path | None = None) -> dict[str, float | int]:
    """Recall of the supporting paragraphs at 2 and 5 for each way of ranking."""
    records = hotpot.load(data_dir or default_data_dir())
    return asyncio.run(_fusion_figures(embedder, records))


async def _fusion_figures(
    embedder: Embedder, records: Sequence[hotpot.Record]
) -> dict[str, float | int]:
    arms = {
        "weighted": ("weighted", 0.5),
        "rrf": ("rrf", 0.5),
        "dense_only": ("weighted", 1.0),
        "lexical_only": ("weighted", 0.0),
    }
    figures: dict[str, float | int] = {"fusion_questions": len(records)}
    with tempfile.TemporaryDirectory(prefix="leangate-fusion-bench-") as root:
        corpora = Corpora(
            CorpusSettings(root=Path(root), max_documents_per_request=10_000), embedder, None
        )
        await corpora.start()
        await corpora.add(TENANT, "hotpot", _paragraph_documents(records))
        vectors = await embedder.aembed([r.question for r in records])
        for arm, (method, weight) in arms.items():
            corpora.settings = corpora.settings.model_copy(update={"fusion": method})
            found = {2: 0.0, 5: 0.0}
            for record, vector in zip(records, vectors, strict=True):
                gold = {t.replace("#", " ") for t, s in record.paragraphs if _supports(record, s)}
                hits = await corpora.search(
                    TENANT, "hotpot", record.question, vector, 5, dense_weight=weight
                )
                for k in found:
                    docs = {h.chunk.doc_id for h in hits[:k]}
                    found[k] += len(docs & gold) / max(1, len(gold))
            for k, total in found.items():
                figures[f"fusion_{arm}_recall_at_{k}"] = rounded(total / len(records), 3)
        await corpora.aclose()
    return figures


def _supports(record: hotpot.Record, sentences: list[str]) -> bool:
    return any(s.strip() in record.supporting for s in sentences)
