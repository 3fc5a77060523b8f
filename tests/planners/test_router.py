"""The SoT router: the shipped weights, the rules, and the scoring used by the bench."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leangate.cache.embedder import Embedder
from leangate.planners.router import RouterWeights, WordVectors, rule_says_no, score


def test_rules_catch_code_and_arithmetic() -> None:
    assert rule_says_no("Write a Python function that reverses a list")
    assert rule_says_no("What is 17 * 23?")
    assert not rule_says_no("What are some ways to make a small garden look bigger?")


def test_shipped_weights_route_clear_cases() -> None:
    weights = RouterWeights.load()
    questions = [
        "What are good habits for keeping a tidy home and what does each one involve?",
        "Compare living in a big city with living in the countryside.",
        "If a train leaves at 3pm going 60 mph, when does it arrive 150 miles away?",
        "Implement a binary search in C and explain the bug in my loop.",
    ]
    vectors = Embedder().embed(questions)
    verdicts = [weights.suits(q, v) for q, v in zip(questions, vectors, strict=True)]
    assert verdicts[2:] == [False, False]
    assert any(verdicts[:2]), "at least one plainly multi-point question goes to SoT"


def test_weights_round_trip(tmp_path: Path) -> None:
    words = WordVectors({"ways": 0, "ways to": 1}, np.array([1.5, 2.0], dtype=np.float32))
    weights = RouterWeights(np.ones(4 + 2, dtype=np.float32), -1.0, 0.6, False, words)
    path = tmp_path / "w.json"
    weights.save(path)
    loaded = RouterWeights.load(path)
    assert loaded.threshold == 0.6 and not loaded.rules
    assert np.allclose(loaded.coef, weights.coef)
    assert loaded.words.terms == words.terms and np.allclose(loaded.words.idf, words.idf)
    question, vector = "Ways to rest, ways to eat?", np.full(4, 0.5, dtype=np.float32)
    assert loaded.probability([question], vector[None, :]) == weights.probability(
        [question], vector[None, :]
    )


def test_word_vectors_match_scikit_learn() -> None:
    """Run time recomputes the TF-IDF that training fitted with scikit-learn."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [
        "What are the best ways to save money?",
        "What are some ways to save time at work, and ways to rest?",
        "Compare cats and dogs as pets; what are the ways they differ?",
        "Solve 2x + 3 = 7. What is x?",
    ]
    fitted = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts)
    words = WordVectors(
        {str(t): int(i) for t, i in fitted.vocabulary_.items()}, fitted.idf_.astype(np.float32)
    )
    unseen = ["Ways to save, ways to SAVE money: what are they?", "nothing known here"]
    expected = fitted.transform(unseen).toarray()
    assert np.allclose(words.matrix(unseen), expected, atol=1e-6)
    assert words.vector(unseen[0]).any() and not words.vector(unseen[1]).any()


def test_score() -> None:
    scores = score([True, True, False, False], [1, 0, 1, 0])
    assert (scores.accuracy, scores.precision, scores.recall) == (0.5, 0.5, 0.5)
