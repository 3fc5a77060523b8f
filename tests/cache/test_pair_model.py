"""The learned pair model: the shipped weights, and the verifier's gate on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leangate.cache.pair_model import FEATURES, PairModel, shipped
from leangate.cache.pair_train import lowest_threshold
from leangate.cache.verify import (
    ACCEPTED,
    IMPROBABLE,
    STRICT,
    Selection,
    Verifier,
    VerifierSettings,
    pair_features,
    text_features,
)

QUERY = "how do i get better at chess?"
NEIGHBORS = [
    ("what are good habits for healthy sleep?", 0.70),
    ("how do i get better at chess in 2020?", 0.69),  # rejected by the numbers rule
]


def test_shipped_model_reads_the_verifiers_features() -> None:
    model = shipped()
    assert model.coef.shape == (len(FEATURES),)
    targets = sorted(model.thresholds, key=float)
    assert targets, "pair_model.json has no thresholds"
    values = [model.thresholds[t] for t in targets]
    assert values == sorted(values), "a higher precision target needs a higher threshold"
    q, c = text_features(QUERY), text_features(NEIGHBORS[0][0])
    assert pair_features(q, c, NEIGHBORS, 0, None, None).shape == (len(FEATURES),)


def test_probability_rises_with_cosine_and_alignment() -> None:
    model = shipped()
    q, c = text_features(QUERY), text_features(NEIGHBORS[0][0])
    base = pair_features(q, c, NEIGHBORS, 0, None, None)
    closer, aligned = base.copy(), base.copy()
    closer[FEATURES.index("cosine")] += 0.2
    aligned[FEATURES.index("token_alignment")] = 1.0
    base[FEATURES.index("token_alignment")] = 0.0
    assert model.probability(closer) > model.probability(base)
    assert model.probability(aligned) > model.probability(base)
    assert 0.0 <= model.probability(np.full(len(FEATURES), 1e6)) <= 1.0


def test_the_gate_refuses_what_the_rules_would_serve() -> None:
    """A near-topic neighbour the rules accept (cosine over 0.65, its rival rejected for a
    changed number), but with no token in common: the model finds it unlikely."""
    query_tokens = np.eye(3, 8, dtype=np.float32)
    unrelated_tokens = np.eye(3, 8, 4, dtype=np.float32)
    tokens: list[np.ndarray | None] = [unrelated_tokens, None]

    def select(verifier: Verifier) -> Selection:
        return verifier.select(QUERY, NEIGHBORS, query_tokens=query_tokens, neighbor_tokens=tokens)

    rules = select(Verifier(VerifierSettings(min_probability=0.0)))
    assert rules.index == 0 and rules.verdict.reason == ACCEPTED
    gated = select(Verifier())
    assert gated.index is None and gated.verdict.reason == IMPROBABLE
    assert STRICT.min_probability > VerifierSettings().min_probability


def test_a_model_of_other_features_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    PairModel(np.zeros(len(FEATURES)), 0.0, {}).save(path)
    assert PairModel.load(path).probability(np.zeros(len(FEATURES))) == pytest.approx(0.5)
    path.write_text(path.read_text().replace('"cosine"', '"dot"'))
    with pytest.raises(ValueError, match="retrain"):
        PairModel.load(path)


def test_lowest_threshold_reaches_the_target() -> None:
    probability = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.4])
    labels = np.array([True, True, True, False, True, False])
    assert lowest_threshold(probability, labels, 1.0) == 0.71  # the grid is in hundredths
    assert lowest_threshold(probability, labels, 0.8) == 0.41
    assert lowest_threshold(probability, ~labels, 0.9) is None


def test_a_rival_of_the_same_text_is_no_runner_up() -> None:
    lead = FEATURES.index("lead_over_runner_up")
    q = text_features(QUERY)
    c = text_features("How do I get better at chess?")
    same = [("How do I get better at chess?", 0.95), ("how do I get better at chess", 0.94)]
    other = [("How do I get better at chess?", 0.95), ("How do I get better at go?", 0.94)]
    assert pair_features(q, c, same, 0, None, None)[lead] == pytest.approx(0.95)
    assert pair_features(q, c, other, 0, None, None)[lead] == pytest.approx(0.01)
