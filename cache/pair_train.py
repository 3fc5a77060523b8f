"""Train the pair model (``cache/pair_model.py``) on the tuning parts of the evaluation sets.

    python -m leangate.cache.pair_train --data-dir ../shared/data

Examples are the nearest cached question of every query of QQP's tuning part and of the
tuning half of ``mock_data.json`` (with its unrelated questions), labelled by whether it
answers the query (:mod:`leangate.cache.semantic_eval` builds the sets; nothing of a
held-out part is read). The thresholds written beside the weights are the lowest
probabilities whose precision reached each target on *both* sets, in a 5-fold
cross-validation grouped by duplicate cluster, so no threshold is read off the examples
that set the weights.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import semantic_eval as se
from .pair_model import WEIGHTS_FILE, PairModel
from .verify import pair_features, text_features

TARGETS = (0.9, 0.95, 0.97, 0.98, 0.99)
C = 1.0
"""Inverse regularisation; 0.3 to 3 gave the same cross-validated curves on the tune parts."""


def examples(prepared: se.Prepared) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Features, labels, groups (duplicate cluster) and kinds of each lookup's nearest entry."""
    rows, labels, groups = [], [], []
    kinds: list[str] = []
    for lookup in prepared.lookups:
        if not lookup.neighbors or lookup.query.split != "tune":
            continue
        text = lookup.neighbors[0][0]
        tokens = lookup.neighbor_tokens[0] if lookup.neighbor_tokens else None
        q, c = text_features(lookup.query.text), text_features(text)
        rows.append(pair_features(q, c, lookup.neighbors, 0, lookup.query_tokens, tokens))
        labels.append(text in lookup.query.correct)
        correct = sorted(lookup.query.correct)
        groups.append(prepared.name + ":" + (correct[0] if correct else lookup.query.text))
        kinds.append(lookup.query.kind)
    return np.array(rows), np.array(labels, dtype=bool), groups, kinds


def _fit(features: np.ndarray, labels: np.ndarray) -> PairModel:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=5000).fit(features, labels)
    return PairModel(model.coef_[0].astype(np.float64), float(model.intercept_[0]), {})


def cross_validated(features: np.ndarray, labels: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Each example's probability from a model fitted without its duplicate cluster."""
    from sklearn.model_selection import GroupKFold

    out = np.zeros(len(labels))
    for train, test in GroupKFold(n_splits=5).split(features, labels, groups):
        model = _fit(features[train], labels[train])
        out[test] = [model.probability(row) for row in features[test]]
    return out


def lowest_threshold(probability: np.ndarray, labels: np.ndarray, target: float) -> float | None:
    """The lowest threshold whose precision reaches ``target`` (None if none does)."""
    best = None
    for threshold in np.round(np.arange(0.99, 0.0, -0.01), 2):
        served = probability >= threshold
        if served.any() and labels[served].mean() >= target:
            best = float(threshold)
    return best


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the semantic cache's pair model")
    parser.add_argument("--data-dir", type=Path, default=se.default_data_dir())
    args = parser.parse_args(argv)
    from .embedder import Embedder

    qqp = se.qqp_eval_sets(se.load_gptcache_pairs(args.data_dir.joinpath(*se.QQP_FILE)))
    mock = se.mock_eval_set(
        se.load_gptcache_pairs(args.data_dir.joinpath(*se.MOCK_FILE)),
        se.load_unrelated_questions(args.data_dir),
    )
    sets = [qqp["tune"], mock]
    embedder = Embedder()
    embedder.load()
    texts = [t for s in sets for t in (*s.entries, *(q.text for q in s.queries))]
    embeddings = se.embed_texts(embedder, texts)
    parts = [examples(se.prepare(embeddings, s)) for s in sets]
    features = np.vstack([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    groups = [g for p in parts for g in p[2]]
    held = cross_validated(features, labels, groups)
    bounds = np.cumsum([0] + [len(p[1]) for p in parts])
    thresholds = {}
    for target in TARGETS:
        each = [
            lowest_threshold(held[a:b], labels[a:b], target) for a, b in itertools.pairwise(bounds)
        ]
        if all(t is not None for t in each):
            thresholds[str(target)] = max(t for t in each if t is not None)
    model = _fit(features, labels)
    model = PairModel(model.coef, model.bias, thresholds)
    model.save(trained_on=[s.name + " (tune part)" for s in sets], examples=len(labels))
    print(f"wrote {WEIGHTS_FILE} from {len(labels)} examples; thresholds {thresholds}")


if __name__ == "__main__":
    main()
