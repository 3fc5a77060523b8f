"""Offline evaluation of the semantic cache's matching (embedder + vector index + verifier).

Two evaluation sets, each a cache of entries and a stream of labelled queries:

* **mock** (GPTCache's ``mock_data.json``): every ``origin`` is cached (one entry per distinct
  text); every ``similar`` must hit its own origin; unrelated questions from other public sets
  must miss. Pairs are split by a hash of the origin into a ``tune`` and a ``holdout`` half.
  The verifier's rules were first designed while reading wrong hits of *both* halves, so this
  holdout is not a clean one; it is kept for continuity.
* **qqp** (Quora duplicate pairs, ``qqp_tune.json``): pairs are grouped into duplicate
  clusters (connected components of the pairs' graph, so labels are transitive), and whole
  clusters are assigned to ``tune`` or ``holdout`` by a hash (:func:`qqp_part`), fixed before
  any example was read. Each part has a cache of its own. Within a part a third of the clusters
  is kept out of the cache (:func:`qqp_cached`): their paraphrases are *cross-pair negatives*,
  near-topic questions whose answer is not cached, and must miss. The others' paraphrases must
  hit an entry of their own cluster.

Precision counts every served hit of a split (on paraphrases and on negatives); recall counts
paraphrases served with a correct entry.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel

from .embedder import Embedding
from .vector_index import VectorIndex
from .verify import ACCEPTED, LOW_SIMILARITY, NO_CANDIDATE, Selection, Verdict

Part = Literal["tune", "holdout"]
Split = Literal["tune", "holdout", "all"]
Kind = Literal["paraphrase", "cross", "unrelated"]
EVAL_SCOPE = "eval"
DEFAULT_K = 4
MOCK_FILE = ("gptcache", "mock_data.json")
QQP_FILE = ("gptcache", "qqp_tune.json")
# Salts of the QQP hashes. Changing one reshuffles the parts: the holdout would stop being
# held out. Fixed before any QQP example was read.
QQP_PART_SALT = b"leangate/qqp/part/v1:"
QQP_CACHED_SALT = b"leangate/qqp/cached/v1:"
QQP_SAMPLE_SALT = b"leangate/qqp/sample/v1:"


class EvalDataError(FileNotFoundError):
    """Evaluation data is missing or malformed."""


class SupportsEmbed(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class Selector(Protocol):
    """What :func:`score` replays: :class:`~leangate.cache.verify.Verifier` or a baseline."""

    def select(
        self,
        query: str,
        neighbors: Sequence[tuple[str, float]],
        *,
        query_tokens: np.ndarray | None = None,
        neighbor_tokens: Sequence[np.ndarray | None] | None = None,
    ) -> Selection: ...


@dataclass(frozen=True)
class ParaphrasePair:
    origin: str
    similar: str


@dataclass(frozen=True)
class Query:
    """A query and the cached texts that may answer it (none: it must miss)."""

    text: str
    correct: frozenset[str]
    kind: Kind
    split: Part


@dataclass(frozen=True)
class EvalSet:
    name: str
    entries: tuple[str, ...]
    queries: tuple[Query, ...]


@dataclass(frozen=True)
class Lookup:
    """One query with its neighbours ``(text, similarity)``, best first, distinct texts."""

    query: Query
    neighbors: tuple[tuple[str, float], ...]
    search_us: float
    query_tokens: np.ndarray | None = None
    neighbor_tokens: tuple[np.ndarray | None, ...] | None = None


class SplitMetrics(BaseModel):
    split: str
    n_queries: int  # paraphrases (queries that should hit)
    hits: int  # served hits on every query of the split, negatives included
    correct_hits: int
    precision: float
    recall: float
    n_cross: int = 0
    cross_false_hits: int = 0
    cross_false_hit_rate: float = 0.0
    n_unrelated: int
    unrelated_false_hits: int
    p50_verify_us: float
    p50_search_us: float
    p99_verify_us: float = 0.0


class SemanticEvalReport(BaseModel):
    name: str = "mock"
    n_entries: int
    k: int
    verifier: dict[str, float | bool]
    splits: dict[str, SplitMetrics]

    def summary(self) -> str:
        lines = [f"{self.name}: {self.n_entries} cached entries, k={self.k}"]
        for m in self.splits.values():
            lines.append(
                f"  {m.split:8s} precision {m.precision:.4f} recall {m.recall:.4f} "
                f"({m.correct_hits}/{m.hits} hits, {m.n_queries} paraphrases) "
                f"cross false hits {m.cross_false_hits}/{m.n_cross} "
                f"unrelated false hits {m.unrelated_false_hits}/{m.n_unrelated} "
                f"verify p50 {m.p50_verify_us:.0f} us p99 {m.p99_verify_us:.0f} us "
                f"search p50 {m.p50_search_us:.0f} us"
            )
        return "\n".join(lines)


def _hash_byte(salt: bytes, text: str) -> int:
    return hashlib.sha256(salt + text.encode()).digest()[0]


def split_of(text: str) -> Part:
    """mock_data's half split (stable across runs and Python versions, unlike hash())."""
    return "tune" if hashlib.sha256(text.encode()).digest()[0] % 2 == 0 else "holdout"


def qqp_part(cluster: str) -> Part:
    """The QQP part of a duplicate cluster (named by :func:`duplicate_clusters`): half each."""
    return "tune" if _hash_byte(QQP_PART_SALT, cluster) % 2 == 0 else "holdout"


def qqp_cached(cluster: str) -> bool:
    """Whether a QQP cluster's origins are cached; the other third make cross-pair negatives."""
    return _hash_byte(QQP_CACHED_SALT, cluster) % 3 != 0


def canonical(text: str) -> str:
    """Lower-cased, whitespace-collapsed: texts equal under this are one question."""
    return " ".join(text.lower().split())


def duplicate_clusters(pairs: Iterable[ParaphrasePair]) -> dict[str, str]:
    """Map each text's :func:`canonical` form to its cluster's name.

    A cluster is a connected component of the graph whose edges are the pairs (duplicates of
    duplicates are duplicates). It is named by its smallest canonical text, which does not
    depend on the order of the pairs.
    """
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for pair in pairs:
        a, b = root(canonical(pair.origin)), root(canonical(pair.similar))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {node: root(node) for node in parent}


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
    """Read a JSON list of ``{origin, similar}`` objects (``mock_data.json``, ``qqp_tune.json``)."""
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
        key = canonical(text)
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


# --- evaluation sets ----------------------------------------------------------------------


def mock_eval_set(pairs: Sequence[ParaphrasePair], unrelated: Sequence[str]) -> EvalSet:
    """Every origin cached; each ``similar`` must hit its own origin; unrelated must miss."""
    entries = tuple(dict.fromkeys(p.origin for p in pairs))
    queries = [
        Query(p.similar, frozenset({p.origin}), "paraphrase", split_of(p.origin)) for p in pairs
    ]
    queries += [Query(text, frozenset(), "unrelated", split_of(text)) for text in unrelated]
    return EvalSet("mock", entries, tuple(queries))


def qqp_eval_sets(pairs: Sequence[ParaphrasePair], *, sample: float = 1.0) -> dict[Part, EvalSet]:
    """One cache and query stream per part; see the module docstring.

    A ``similar`` equal (up to case and spacing) to a cached text would be an exact hit, and a
    text seen before in the part adds nothing: both are left out. ``sample`` < 1 keeps that
    share of the clusters (by a hash, after clustering the whole file), for quick runs.
    """
    clusters = duplicate_clusters(pairs)
    kept = [
        p
        for p in pairs
        if _hash_byte(QQP_SAMPLE_SALT, clusters[canonical(p.origin)]) < sample * 256
    ]
    sets: dict[Part, EvalSet] = {}
    for part in ("tune", "holdout"):
        mine = [p for p in kept if qqp_part(clusters[canonical(p.origin)]) == part]
        cached = [p for p in mine if qqp_cached(clusters[canonical(p.origin)])]
        entries = {canonical(p.origin): p.origin for p in cached}
        by_cluster: dict[str, set[str]] = {}
        for key, text in entries.items():
            by_cluster.setdefault(clusters[key], set()).add(text)
        seen = set(entries)
        queries = []
        for pair in mine:
            key = canonical(pair.similar)
            if key in seen:
                continue
            seen.add(key)
            correct = frozenset(by_cluster.get(clusters[key], ()))
            queries.append(Query(pair.similar, correct, "paraphrase" if correct else "cross", part))
        sets[part] = EvalSet(f"qqp-{part}", tuple(entries.values()), tuple(queries))
    return sets


# --- embedding and neighbours -------------------------------------------------------------


def embed_texts(embedder: SupportsEmbed, texts: Iterable[str]) -> dict[str, Embedding]:
    """Embed each distinct text once (with content tokens when the embedder has ``encode``)."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    encode = getattr(embedder, "encode", None)
    if encode is not None:
        return dict(zip(unique, encode(unique), strict=True))
    return {
        text: Embedding(vector) for text, vector in zip(unique, embedder.embed(unique), strict=True)
    }


@dataclass(frozen=True)
class Prepared:
    """Neighbours of every query, computed once; verification is replayed by :func:`score`."""

    name: str
    n_entries: int
    k: int
    lookups: tuple[Lookup, ...]


def prepare(
    embeddings: Mapping[str, Embedding], eval_set: EvalSet, *, k: int = DEFAULT_K
) -> Prepared:
    """Index the set's entries, then search neighbours for every query.

    ``embeddings`` must hold every entry and query text (see :func:`embed_texts`).
    """
    entries = eval_set.entries
    index = VectorIndex(next(iter(embeddings.values())).vector.shape[0])
    for i, text in enumerate(entries):
        index.add(EVAL_SCOPE, str(i), embeddings[text].vector)
    lookups = [_lookup(index, entries, embeddings, query, k) for query in eval_set.queries]
    return Prepared(eval_set.name, len(entries), k, tuple(lookups))


def _lookup(
    index: VectorIndex,
    entries: Sequence[str],
    embeddings: Mapping[str, Embedding],
    query: Query,
    k: int,
) -> Lookup:
    embedding = embeddings[query.text]
    start = time.perf_counter()
    found = index.search(EVAL_SCOPE, embedding.vector, k)
    elapsed = (time.perf_counter() - start) * 1e6
    texts = [entries[int(n.entry_id)] for n in found]
    return Lookup(
        query,
        tuple((text, n.score) for text, n in zip(texts, found, strict=True)),
        elapsed,
        query_tokens=embedding.tokens,
        neighbor_tokens=tuple(embeddings[text].tokens for text in texts),
    )


# --- scoring ------------------------------------------------------------------------------


class CosineThreshold:
    """The baseline: serve the nearest entry when its cosine reaches ``threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def select(
        self,
        query: str,
        neighbors: Sequence[tuple[str, float]],
        *,
        query_tokens: np.ndarray | None = None,
        neighbor_tokens: Sequence[np.ndarray | None] | None = None,
    ) -> Selection:
        if not neighbors:
            return Selection(None, Verdict(False, 0.0, NO_CANDIDATE))
        sim = neighbors[0][1]
        if sim < self.threshold:
            return Selection(None, Verdict(False, sim, LOW_SIMILARITY))
        return Selection(0, Verdict(True, sim, ACCEPTED))


def choose_threshold(prepared: Prepared, target_precision: float, split: Part = "tune") -> float:
    """The lowest cosine threshold whose precision on ``split`` reaches ``target_precision``.

    The lowest such threshold serves the most. 1.0 (nearly nothing served) if none does.
    """
    scored = sorted(
        (
            (lookup.neighbors[0][1], lookup.neighbors[0][0] in lookup.query.correct)
            for lookup in prepared.lookups
            if lookup.query.split == split and lookup.neighbors
        ),
        reverse=True,
    )
    best, correct = 1.0, 0
    for served, (sim, ok) in enumerate(scored, start=1):
        correct += ok
        next_sim = scored[served][0] if served < len(scored) else None
        if next_sim != sim and correct / served >= target_precision:
            best = sim
    return best


@dataclass
class _Tally:
    n_queries: int = 0
    hits: int = 0
    correct: int = 0
    n_cross: int = 0
    false_cross: int = 0
    n_unrelated: int = 0
    false_unrelated: int = 0

    def record(self, query: Query, served: str | None) -> None:
        self.hits += served is not None
        if query.kind == "paraphrase":
            self.n_queries += 1
            self.correct += served in query.correct
        elif query.kind == "cross":
            self.n_cross += 1
            self.false_cross += served is not None
        else:
            self.n_unrelated += 1
            self.false_unrelated += served is not None


def _splits_for(holdout: bool | None) -> tuple[Split, ...]:
    if holdout is None:
        return ("tune", "holdout", "all")
    return ("holdout",) if holdout else ("tune",)


def served_text(lookup: Lookup, selector: Selector) -> str | None:
    """The cached text ``selector`` serves for ``lookup``, or None (a miss)."""
    selection = selector.select(
        lookup.query.text,
        lookup.neighbors,
        query_tokens=lookup.query_tokens,
        neighbor_tokens=lookup.neighbor_tokens,
    )
    return None if selection.index is None else lookup.neighbors[selection.index][0]


def score(
    prepared: Prepared,
    selector: Selector,
    *,
    holdout: bool | None = None,
) -> SemanticEvalReport:
    """Replay verification over prepared lookups and aggregate per split."""
    wanted = _splits_for(holdout)
    tallies: dict[str, _Tally] = {name: _Tally() for name in wanted}
    verify_us: dict[str, list[float]] = {name: [] for name in wanted}
    search_us: dict[str, list[float]] = {name: [] for name in wanted}
    for lookup in prepared.lookups:
        names = [s for s in (lookup.query.split, "all") if s in tallies]
        if not names:
            continue
        start = time.perf_counter()
        served = served_text(lookup, selector)
        elapsed = (time.perf_counter() - start) * 1e6
        for name in names:
            tallies[name].record(lookup.query, served)
            if lookup.query.kind == "paraphrase":  # negatives mostly stop at the threshold
                verify_us[name].append(elapsed)
                search_us[name].append(lookup.search_us)
    settings = getattr(selector, "settings", None)
    return SemanticEvalReport(
        name=prepared.name,
        n_entries=prepared.n_entries,
        k=prepared.k,
        verifier=settings.model_dump() if isinstance(settings, BaseModel) else {},
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
        n_cross=t.n_cross,
        cross_false_hits=t.false_cross,
        cross_false_hit_rate=t.false_cross / t.n_cross if t.n_cross else 0.0,
        n_unrelated=t.n_unrelated,
        unrelated_false_hits=t.false_unrelated,
        p50_verify_us=_median(verify_us),
        p99_verify_us=float(np.percentile(verify_us, 99)) if verify_us else 0.0,
        p50_search_us=_median(search_us),
    )
