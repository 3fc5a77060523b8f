"""The offline evaluation's QQP protocol on tiny invented sets: clusters, split, labels, scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from leangate.cache.semantic_eval import (
    CosineThreshold,
    EvalDataError,
    ParaphrasePair,
    Prepared,
    canonical,
    choose_threshold,
    duplicate_clusters,
    embed_texts,
    load_gptcache_pairs,
    prepare,
    qqp_cached,
    qqp_eval_sets,
    qqp_part,
    score,
)
from leangate.cache.verify import Verifier

# Two clusters joined only through a shared text ("b"), and one pair on its own.
CHAIN = [
    ParaphrasePair("How do owls see at night?", "Why can owls see in the dark?"),
    ParaphrasePair("Why can owls see in the dark?", "What lets owls see at night?"),
    ParaphrasePair("How tall is a giraffe?", "What height does a giraffe reach?"),
]


def synthetic_pairs(n: int) -> list[ParaphrasePair]:
    """``n`` clusters of three texts each, chained by two pairs (a-b, b-c)."""
    out = []
    for i in range(n):
        a, b, c = (f"Question {i} worded {w}?" for w in "abc")
        out += [ParaphrasePair(a, b), ParaphrasePair(b, c)]
    return out


def test_clusters_are_transitive_and_independent_of_order() -> None:
    clusters = duplicate_clusters(CHAIN)
    owls = {clusters[canonical(t)] for p in CHAIN[:2] for t in (p.origin, p.similar)}
    assert len(owls) == 1
    assert clusters[canonical(CHAIN[2].origin)] == clusters[canonical(CHAIN[2].similar)]
    assert clusters[canonical(CHAIN[2].origin)] not in owls
    assert duplicate_clusters(reversed(CHAIN)) == clusters
    flipped = [ParaphrasePair(p.similar, p.origin) for p in CHAIN]
    assert duplicate_clusters(flipped) == clusters


def test_cluster_names_ignore_case_and_spacing() -> None:
    pairs = [ParaphrasePair("Is  tea healthy?", "Is tea good for you?")]
    pairs.append(ParaphrasePair("is tea healthy?", "Does tea help health?"))
    assert len(set(duplicate_clusters(pairs).values())) == 1


def test_split_is_stable_cluster_aware_and_disjoint() -> None:
    pairs = synthetic_pairs(200)
    sets = qqp_eval_sets(pairs)
    clusters = duplicate_clusters(pairs)
    texts = {
        part: {canonical(t) for t in (*s.entries, *(q.text for q in s.queries))}
        for part, s in sets.items()
    }
    assert texts["tune"] and texts["holdout"]
    assert not texts["tune"] & texts["holdout"]
    for part, found in texts.items():
        assert {qqp_part(clusters[t]) for t in found} == {part}
    # Fixed by the hash, not by the run: the same answer again, and a known value.
    assert qqp_eval_sets(pairs) == sets
    assert [qqp_part(f"cluster {i}") for i in range(3)] == [
        qqp_part(f"cluster {i}") for i in range(3)
    ]
    share = sum(qqp_part(f"c{i}") == "tune" for i in range(2000)) / 2000
    assert 0.45 < share < 0.55
    cached = sum(qqp_cached(f"c{i}") for i in range(3000)) / 3000
    assert 0.62 < cached < 0.71


def test_labels_are_transitive_and_uncached_clusters_are_negatives() -> None:
    pairs = synthetic_pairs(300)
    clusters = duplicate_clusters(pairs)
    for eval_set in qqp_eval_sets(pairs).values():
        entries = set(eval_set.entries)
        for query in eval_set.queries:
            cluster = clusters[canonical(query.text)]
            if qqp_cached(cluster):
                # "c" is paired only with "b", yet "a" (an entry) answers it too.
                assert query.kind == "paraphrase"
                assert query.correct == {e for e in entries if clusters[canonical(e)] == cluster}
                assert query.text not in entries
            else:
                assert query.kind == "cross"
                assert query.correct == frozenset()
        kinds = {q.kind for q in eval_set.queries}
        assert kinds == {"paraphrase", "cross"}


def test_sample_keeps_whole_clusters() -> None:
    pairs = synthetic_pairs(400)
    full, sample = qqp_eval_sets(pairs), qqp_eval_sets(pairs, sample=0.25)
    for part in ("tune", "holdout"):
        kept = {q.text for q in sample[part].queries}
        assert kept <= {q.text for q in full[part].queries}
        assert 0.1 < len(kept) / len(full[part].queries) < 0.4


class ToyEmbedder:
    """Each text's vector: a fixed direction per topic word, so neighbours are predictable."""

    TOPICS = ("owl", "giraffe", "shark")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            row = np.array([t in text.lower() for t in self.TOPICS], dtype=np.float32) + 0.01
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows)


def toy_prepared() -> Prepared:
    pairs = [
        ParaphrasePair("How do owls see at night?", "Why can owls see in the dark?"),
        ParaphrasePair("Why can owls see in the dark?", "What lets owls see at night?"),
        ParaphrasePair("How tall is a giraffe?", "What height does a giraffe reach?"),
        ParaphrasePair("How fast is a shark?", "What speed can sharks reach?"),
    ]
    sets = qqp_eval_sets(pairs)
    eval_set = sets["tune"] if sets["tune"].queries else sets["holdout"]
    texts = [*eval_set.entries, *(q.text for q in eval_set.queries)]
    return prepare(embed_texts(ToyEmbedder(), texts), eval_set, k=2)


def test_score_counts_hits_by_cluster_and_cosine_baseline() -> None:
    prepared = toy_prepared()
    part = prepared.lookups[0].query.split
    report = score(prepared, CosineThreshold(0.5), holdout=part == "holdout")
    metrics = report.splits[part]
    paraphrases = [lk for lk in prepared.lookups if lk.query.kind == "paraphrase"]
    assert metrics.n_queries == len(paraphrases)
    assert metrics.correct_hits == sum(lk.neighbors[0][0] in lk.query.correct for lk in paraphrases)
    assert score(prepared, CosineThreshold(1.01)).splits["all"].hits == 0
    assert report.verifier == {}
    assert (
        score(prepared, Verifier()).verifier["min_similarity"] == Verifier().settings.min_similarity
    )


def test_choose_threshold_reaches_the_target() -> None:
    prepared = toy_prepared()
    part = prepared.lookups[0].query.split
    threshold = choose_threshold(prepared, 0.99, split=part)
    report = score(prepared, CosineThreshold(threshold), holdout=part == "holdout")
    assert report.splits[part].precision >= 0.99


def test_missing_data_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "qqp_tune.json"
    with pytest.raises(EvalDataError, match=r"qqp_tune\.json"):
        load_gptcache_pairs(missing)


def test_pair_examples_label_each_querys_nearest_entry() -> None:
    from leangate.cache.pair_model import FEATURES
    from leangate.cache.pair_train import examples

    prepared = toy_prepared()
    part = prepared.lookups[0].query.split
    features, labels, groups, kinds = examples(prepared)
    if part != "tune":
        assert len(labels) == 0  # nothing of a held-out part is read
        return
    searched = [lk for lk in prepared.lookups if lk.neighbors]
    assert features.shape == (len(searched), len(FEATURES))
    assert list(labels) == [lk.neighbors[0][0] in lk.query.correct for lk in searched]
    assert len(groups) == len(kinds) == len(searched)
