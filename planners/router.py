"""Which questions suit Skeleton-of-Thought: a light classifier on the question's words and
its sentence embedding.

A question suits SoT when its answer has independent points (lists, comparisons, advice,
explanations with several aspects); math, code and step-by-step reasoning do not, because
their parts depend on each other. The classifier is a logistic regression over the shared
MiniLM embedding joined with the question's word and word-pair TF-IDF (the embedding
carries the topic; the words carry the form: "ways to", "compare", "tips"). It is trained
on the hand-labelled questions in ``shared/data/sot`` and shipped as
``router_weights.json``: weights, bias, the word vocabulary and its idf, read with numpy
(no training library at run time). Rules for code and arithmetic override it where
cross-validation showed they help (``router_weights.json`` says whether they are on).

Retrain with ``python -m leangate.planners.router --data-dir ../shared/data``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

WEIGHTS_FILE = Path(__file__).with_name("router_weights.json")
ROUTER_SETS = ("vicuna_router.csv", "wizardlm_router.csv")

_CODE = re.compile(
    r"\b(code|function|program|script|implement|algorithm|python|java(script)?|c\+\+|sql|"
    r"regex|class|compile|debug|api)\b|```",
    re.IGNORECASE,
)
_MATH = re.compile(
    r"\d\s*[-+*/^=\u00d7\u00f7]\s*\d|\b(solve|calculate|compute|equation|integral|derivative|"
    r"probability|how many|how much|what is the (value|sum|product|result)|prove)\b",
    re.IGNORECASE,
)


def rule_says_no(question: str) -> bool:
    """Code and arithmetic: the answer's parts depend on each other."""
    return bool(_CODE.search(question) or _MATH.search(question))


_WORD = re.compile(r"(?u)\b\w\w+\b")


@dataclass(frozen=True)
class WordVectors:
    """Word and word-pair TF-IDF, as scikit-learn's ``TfidfVectorizer(ngram_range=(1, 2),
    sublinear_tf=True)`` computes it (``tests/planners/test_router.py`` checks the match),
    so that run time needs only the vocabulary and its idf."""

    terms: dict[str, int] = field(default_factory=dict)
    idf: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def vector(self, text: str) -> np.ndarray:
        out = np.zeros(len(self.terms), dtype=np.float32)
        words = _WORD.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        for gram, count in Counter(g for g in grams if g in self.terms).items():
            index = self.terms[gram]
            out[index] = (1.0 + math.log(count)) * self.idf[index]
        norm = float(np.linalg.norm(out))
        return out / norm if norm else out

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.vector(t) for t in texts]) if texts else np.zeros((0, 0))


@dataclass(frozen=True)
class RouterWeights:
    coef: np.ndarray
    bias: float
    threshold: float = 0.5
    rules: bool = True
    words: WordVectors = field(default_factory=WordVectors)
    """Empty in weights trained on the embedding alone."""

    @classmethod
    def load(cls, path: Path = WEIGHTS_FILE) -> RouterWeights:
        data = json.loads(path.read_text())
        words = WordVectors(
            {term: i for i, term in enumerate(data.get("terms", []))},
            np.asarray(data.get("idf", []), dtype=np.float32),
        )
        return cls(
            np.asarray(data["coef"], dtype=np.float32),
            float(data["bias"]),
            float(data.get("threshold", 0.5)),
            bool(data.get("rules", True)),
            words,
        )

    def save(self, path: Path = WEIGHTS_FILE) -> None:
        data = {
            "coef": [round(float(c), 6) for c in self.coef],
            "bias": self.bias,
            "threshold": self.threshold,
            "rules": self.rules,
            "terms": sorted(self.words.terms, key=self.words.terms.__getitem__),
            "idf": [round(float(w), 6) for w in self.words.idf],
        }
        path.write_text(json.dumps(data) + "\n")

    def probability(self, questions: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """P(suits SoT) for each question, beside its unit-norm embedding."""
        features = np.asarray(vectors, dtype=np.float32)
        if self.words.terms:
            features = np.hstack([features, self.words.matrix(questions)])
        logits = features @ self.coef + self.bias
        return np.asarray(1.0 / (1.0 + np.exp(-logits)))

    def suits(self, question: str, vector: np.ndarray) -> bool:
        if self.rules and rule_says_no(question):
            return False
        return bool(self.probability([question], vector[None, :])[0] >= self.threshold)


# --- training --------------------------------------------------------------------------------


def read_labelled(data_dir: Path) -> list[tuple[str, int, str]]:
    """``(question, label, set name)`` of every labelled router set found."""
    rows: list[tuple[str, int, str]] = []
    for name in ROUTER_SETS:
        path = data_dir / "sot" / name
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle, delimiter=";"):
                rows.append((row["request"], int(row["label"]), name))
    return rows


THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
TARGET_PRECISION = 0.8
"""A wrong "suits SoT" costs more than a missed one (a slower, worse answer against a
direct one), so the threshold is the lowest whose precision reaches this on held-out folds."""


def fit(
    questions: Sequence[str], vectors: np.ndarray, labels: Sequence[int], *, rules: bool = True
) -> RouterWeights:
    """The classifier, with its threshold chosen by an inner cross-validation on the same
    training data."""
    threshold = _choose_threshold(questions, vectors, labels, rules=rules)
    return replace(_train(questions, vectors, labels, rules=rules), threshold=threshold)


def _train(
    questions: Sequence[str], vectors: np.ndarray, labels: Sequence[int], *, rules: bool
) -> RouterWeights:
    """A logistic regression (scikit-learn, at training time only) on the embedding and
    the word TF-IDF of a vocabulary learnt from these questions alone."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    vectorizer.fit(questions)
    terms = {str(term): int(i) for term, i in vectorizer.vocabulary_.items()}
    words = WordVectors(terms, vectorizer.idf_.astype(np.float32))
    features = np.hstack([np.asarray(vectors, dtype=np.float32), words.matrix(questions)])
    model = LogisticRegression(C=4.0, max_iter=3000)
    model.fit(features, np.asarray(labels))
    return RouterWeights(
        model.coef_[0].astype(np.float32), float(model.intercept_[0]), 0.5, rules, words
    )


def _choose_threshold(
    questions: Sequence[str], vectors: np.ndarray, labels: Sequence[int], *, rules: bool
) -> float:
    from sklearn.model_selection import StratifiedKFold

    held_out = np.zeros(len(labels))
    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=1)
    for train, test in folds.split(vectors, labels):
        inner = _train(
            [questions[i] for i in train], vectors[train], [labels[i] for i in train], rules=rules
        )
        held_out[test] = inner.probability([questions[i] for i in test], vectors[test])
    vetoed = np.array([rules and rule_says_no(q) for q in questions], dtype=bool)
    for threshold in THRESHOLDS:
        if score(list((held_out >= threshold) & ~vetoed), labels).precision >= TARGET_PRECISION:
            return threshold
    return THRESHOLDS[-1]


@dataclass(frozen=True)
class Scores:
    accuracy: float
    precision: float
    recall: float


def score(predicted: Sequence[bool], labels: Sequence[int]) -> Scores:
    p = np.asarray(predicted, dtype=bool)
    y = np.asarray(labels, dtype=bool)
    true_pos = float((p & y).sum())
    return Scores(
        accuracy=float((p == y).mean()),
        precision=true_pos / max(float(p.sum()), 1.0),
        recall=true_pos / max(float(y.sum()), 1.0),
    )


def cross_validate(
    questions: Sequence[str],
    vectors: np.ndarray,
    labels: Sequence[int],
    *,
    folds: int = 5,
    rules: bool = True,
    seed: int = 0,
) -> Scores:
    """Stratified k-fold: every question is predicted by a model that never saw it."""
    from sklearn.model_selection import StratifiedKFold

    predicted = np.zeros(len(labels), dtype=bool)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(vectors, labels):
        weights = fit(
            [questions[i] for i in train], vectors[train], [labels[i] for i in train], rules=rules
        )
        predicted[test] = [weights.suits(questions[i], vectors[i]) for i in test]
    return score(list(predicted), labels)


CV_SEEDS = range(5)


def repeated_cross_validate(
    questions: Sequence[str], vectors: np.ndarray, labels: Sequence[int], *, rules: bool = True
) -> Scores:
    """The mean of :func:`cross_validate` over :data:`CV_SEEDS`: one split of 298 questions
    moves accuracy by about 0.02, more than the differences worth deciding on."""
    runs = [cross_validate(questions, vectors, labels, rules=rules, seed=s) for s in CV_SEEDS]
    return Scores(
        accuracy=float(np.mean([r.accuracy for r in runs])),
        precision=float(np.mean([r.precision for r in runs])),
        recall=float(np.mean([r.recall for r in runs])),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the SoT router on the labelled sets")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = parser.parse_args(argv)
    from leangate.cache.embedder import Embedder

    rows = read_labelled(args.data_dir)
    questions = [q for q, _, _ in rows]
    labels = [label for _, label, _ in rows]
    vectors = Embedder().embed(questions)
    scores = {
        rules: repeated_cross_validate(questions, vectors, labels, rules=rules)
        for rules in (False, True)
    }
    for rules, cv in scores.items():
        print(f"nested 5-fold CV, mean of {len(CV_SEEDS)} seeds, rules={rules}: {cv}")
    keep_rules = scores[True].accuracy > scores[False].accuracy
    fit(questions, vectors, labels, rules=keep_rules).save()
    print(f"wrote {WEIGHTS_FILE} from {len(rows)} labelled questions")


if __name__ == "__main__":
    main()
