"""Offline evaluation of the semantic cache's matching (embedder + vector index + verifier).

Protocol: every ``origin`` of GPTCache's ``mock_data.json`` is cached (one entry per distinct
text), every ``similar`` is looked up and counts as a correct hit only if the served entry's
text equals its own origin. Unrelated questions from other public sets are looked up too and
must all miss. Pairs are split by a hash of the origin into a ``tune`` half (used to choose the
verifier's defaults) and a ``holdout`` half (reported); unrelated questions are split the same
way by their own text.

Embedding and neighbour search are done once by :func:`prepare`; :func:`score` then replays
verification, so a parameter sweep costs well under a second per setting. A :class:`Prepared`
pickles, so a sweep can reuse one across processes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel

from .embedder import Embedding
from .vector_index import VectorIndex
from .verify import Verifier

Split = Literal["tune", "holdout", "all"]
EVAL_SCOPE = "eval"
DEFAULT_K = 4


class EvalDataError(FileNotFoundError):
    """Evaluation data is missing or malformed."""


class SupportsEmbed(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class ParaphrasePair:
    origin: str
    similar: str


@dataclass(frozen=True)
class Lookup:
    """One query with its neighbours ``(text, similarity)``, best first, distinct texts."""

    query: str
    expected: str | None  # None for unrelated questions: any hit is false
    split: Literal["tune", "holdout"]
    neighbors: tuple[tuple[str, float], ...]
    search_us: float
    query_tokens: np.ndarray | None = None
    neighbor_tokens: tuple[np.ndarray | None, ...] | None = None


class SplitMetrics(BaseModel):
    split: str
    n_queries: int
    hits: int
    correct_hits: int
    precision: float
    recall: float
    n_unrelated: int
    unrelated_false_hits: int
    p50_verify_us: float
    p50_search_us: float
    p99_verify_us: float = 0.0


class SemanticEvalReport(BaseModel):
    n_entries: int
    k: int
    verifier: dict[str, float | bool]
    splits: dict[str, SplitMetrics]

    def summary(self) -> str:
        lines = [f"{self.n_entries} cached entries, k={self.k}, verifier={self.verifier}"]
        for m in self.splits.values():
            lines.append(
                f"{m.split:8s} precision {m.precision:.4f} recall {m.recall:.4f} "
                f"({m.correct_hits}/{m.hits} hits of {m.n_queries}) unrelated false hits "
                f"{m.unrelated_false_hits}/{m.n_unrelated} verify p50 {m.p50_verify_us:.0f} us "
                f"p99 {m.p99_verify_us:.0f} us "
                f"search p50 {m.p50_search_us:.0f} us"
            )
        return "\n".join(lines)


def split_of(text: str) -> Literal["tune", "holdout"]:
    """Deterministic half split (stable across runs and Python versions, unlike hash())."""
    return "tune" if hashlib.sha256(text.encode()).digest()[0] % 2 == 0 else "holdout"


def default_data_dir() -> Path:
    """``../shared/data`` beside the repository root."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --- data loading -------------------------------------------------------------------------


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise EvalDataError(
            f"evaluation data not found: {path} (expected the public data sets under "
            f"../shared/data beside the repository; see its README.md)"
        )
    return path


def load_gptcache_pairs(path: Path) -> list[ParaphrasePair]:
    """Read GPTCache's ``mock_data.json`` (a list of ``{origin, similar}`` objects)."""
    try:
        rows = json.loads(_require_file(path).read_text(encoding="utf-8"))
        pairs = [ParaphrasePair(str(r["origin"]), str(r["similar"])) for r in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalDataError(f"{path}: expected a JSON list of {{origin, similar}}: {exc}") from exc
    if not pairs:
        raise EvalDataError(f"{path}: no pairs")
    return pairs


def _jsonl(path: Path) -> Iterator[dict[str, object]]:
    with _require_file(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _first_turns(path: Path) -> list[str]:
    return [str(row["turns"][0]) for row in _jsonl(path)]  # type: ignore[index]


def _csv_requests(path: Path) -> list[str]:
    with _require_file(path).open(encoding="utf-8", newline="") as handle:
        return [row["request"] for row in csv.DictReader(handle)]


def _hotpot_questions(path: Path) -> list[str]:
    return [str(r["question"]) for r in json.loads(_require_file(path).read_text("utf-8"))]


def _round_robin(sources: Sequence[Sequence[str]]) -> Iterator[str]:
    longest = max((len(s) for s in sources), default=0)
    for i in range(longest):
        for source in sources:
            if i < len(source):
                yield source[i]


def _dedupe(texts: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for text in texts:
        key = " ".join(text.lower().split())
        if key and key not in seen:
            seen.add(key)
            yield text


def load_unrelated_questions(data_dir: Path, n: int = 1000) -> list[str]:
    """``n`` questions unrelated to mock_data.json, interleaved from five public sets.

    MT-bench, Vicuna-80, WizardLM and HotpotQA are used in full; GSM8K fills the rest.
    """
    if not data_dir.is_dir():
        raise EvalDataError(f"evaluation data directory not found: {data_dir}")
    sources = [
        _first_turns(data_dir / "fastchat" / "mt_bench_question.jsonl"),
        _first_turns(data_dir / "fastchat" / "vicuna_bench_question.jsonl"),
        _csv_requests(data_dir / "sot" / "wizardlm_data.csv"),
        _hotpot_questions(data_dir / "hotpotqa" / "dev_distractor_20.json"),
        [str(row["question"]) for row in _jsonl(data_dir / "gsm8k" / "test.jsonl")],
    ]
    questions = list(_dedupe(_round_robin(sources)))
    if len(questions) < n:
        raise EvalDataError(f"only {len(questions)} unrelated questions in {data_dir}, need {n}")
    return questions[:n]


# --- evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """Neighbours of every query, computed once; verification is replayed by :func:`score`."""

    n_entries: int
    k: int
    lookups: tuple[Lookup, ...]


def prepare(
    embedder: SupportsEmbed,
    pairs: Sequence[ParaphrasePair],
    unrelated: Sequence[str],
    *,
    k: int = DEFAULT_K,
) -> Prepared:
    """Cache every distinct origin, then search neighbours for every query.

    With an embedder that has ``encode`` (:class:`~leangate.cache.embedder.Embedder`), content
    token embeddings are kept too, for the verifier's token alignment.
    """
    entries = list(dict.fromkeys(p.origin for p in pairs))
    queries = [p.similar for p in pairs] + list(unrelated)
    texts = entries + queries
    tokens: list[np.ndarray | None]
    if hasattr(embedder, "encode"):
        encoded = embedder.encode(texts)
        vectors = np.stack([e.vector for e in encoded])
        tokens = [e.tokens for e in encoded]
    else:
        vectors = embedder.embed(texts)
        tokens = [None] * len(texts)
    index = VectorIndex(vectors.shape[1])
    for i, vector in enumerate(vectors[: len(entries)]):
        index.add(EVAL_SCOPE, str(i), vector)
    expected: list[str | None] = [p.origin for p in pairs]
    expected += [None] * len(unrelated)
    entry_tokens = tokens[: len(entries)]
    lookups = [
        _lookup(index, entries, entry_tokens, query, Embedding(vector, query_tokens), origin, k)
        for query, vector, query_tokens, origin in zip(
            queries, vectors[len(entries) :], tokens[len(entries) :], expected, strict=True
        )
    ]
    return Prepared(n_entries=len(entries), k=k, lookups=tuple(lookups))


def _lookup(
    index: VectorIndex,
    entries: Sequence[str],
    entry_tokens: Sequence[np.ndarray | None],
    query: str,
    embedding: Embedding,
    expected: str | None,
    k: int,
) -> Lookup:
    start = time.perf_counter()
    found = index.search(EVAL_SCOPE, embedding.vector, k)
    elapsed = (time.perf_counter() - start) * 1e6
    neighbors = tuple((entries[int(n.entry_id)], n.score) for n in found)
    return Lookup(
        query,
        expected,
        split_of(expected or query),
        neighbors,
        elapsed,
        query_tokens=embedding.tokens,
        neighbor_tokens=tuple(entry_tokens[int(n.entry_id)] for n in found),
    )


@dataclass
class _Tally:
    n_queries: int = 0
    hits: int = 0
    correct: int = 0
    n_unrelated: int = 0
    false_unrelated: int = 0

    def record(self, lookup: Lookup, served: str | None) -> None:
        if lookup.expected is None:
            self.n_unrelated += 1
            self.false_unrelated += served is not None
            return
        self.n_queries += 1
        self.hits += served is not None
        self.correct += served == lookup.expected


def _splits_for(holdout: bool | None) -> tuple[Split, ...]:
    if holdout is None:
        return ("tune", "holdout", "all")
    return ("holdout",) if holdout else ("tune",)


def score(
    prepared: Prepared, verifier: Verifier, *, holdout: bool | None = None
) -> SemanticEvalReport:
    """Replay verification over prepared lookups and aggregate per split."""
    wanted = _splits_for(holdout)
    tallies: dict[str, _Tally] = {name: _Tally() for name in wanted}
    verify_us: dict[str, list[float]] = {name: [] for name in wanted}
    search_us: dict[str, list[float]] = {name: [] for name in wanted}
    for lookup in prepared.lookups:
        names = [s for s in (lookup.split, "all") if s in tallies]
        if not names:
            continue
        start = time.perf_counter()
        selection = verifier.select(
            lookup.query,
            lookup.neighbors,
            query_tokens=lookup.query_tokens,
            neighbor_tokens=lookup.neighbor_tokens,
        )
        elapsed = (time.perf_counter() - start) * 1e6
        served = None if selection.index is None else lookup.neighbors[selection.index][0]
        for name in names:
            tallies[name].record(lookup, served)
            if lookup.expected is not None:  # unrelated lookups mostly stop at the threshold
                verify_us[name].append(elapsed)
                search_us[name].append(lookup.search_us)
    return SemanticEvalReport(
        n_entries=prepared.n_entries,
        k=prepared.k,
        verifier=verifier.settings.model_dump(),
        splits={
            name: _metrics(name, tallies[name], verify_us[name], search_us[name]) for name in wanted
        },
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _metrics(name: str, t: _Tally, verify_us: list[float], search_us: list[float]) -> SplitMetrics:
    return SplitMetrics(
        split=name,
        n_queries=t.n_queries,
        hits=t.hits,
        correct_hits=t.correct,
        precision=t.correct / t.hits if t.hits else 1.0,
        recall=t.correct / t.n_queries if t.n_queries else 0.0,
        n_unrelated=t.n_unrelated,
        unrelated_false_hits=t.false_unrelated,
        p50_verify_us=_median(verify_us),
        p99_verify_us=float(np.percentile(verify_us, 99)) if verify_us else 0.0,
        p50_search_us=_median(search_us),
    )


def evaluate(
    embedder: SupportsEmbed,
    verifier: Verifier,
    pairs: Sequence[ParaphrasePair],
    unrelated: Sequence[str],
    *,
    holdout: bool | None = None,
    k: int = DEFAULT_K,
) -> SemanticEvalReport:
    """Embed, index and verify; report the ``tune`` / ``holdout`` / ``all`` splits.

    ``holdout=None`` reports all three, ``True`` only the held-out half, ``False`` only the
    tuning half.
    """
    return score(prepare(embedder, pairs, unrelated, k=k), verifier, holdout=holdout)
