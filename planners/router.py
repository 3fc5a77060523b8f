"""Which questions suit Skeleton-of-Thought: a light classifier on sentence embeddings.

A question suits SoT when its answer has independent points (lists, comparisons, advice,
explanations with several aspects); math, code and step-by-step reasoning do not, because
their parts depend on each other. The classifier is a logistic regression over the shared
MiniLM embedding, trained on the hand-labelled questions in ``shared/data/sot`` and
shipped as ``router_weights.json`` (384 weights and a bias, read with numpy: no training
library at run time). Rules for code and arithmetic override it where cross-validation
showed they help (``router_weights.json`` says whether they are on; on the labelled sets
here they did not help, so they are off).

Retrain with ``python -m leangate.planners.router --data-dir ../shared/data``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RouterWeights:
    coef: np.ndarray
    bias: float
    threshold: float = 0.5
    rules: bool = True

    @classmethod
    def load(cls, path: Path = WEIGHTS_FILE) -> RouterWeights:
        data = json.loads(path.read_text())
        return cls(
            np.asarray(data["coef"], dtype=np.float32),
            float(data["bias"]),
            float(data.get("threshold", 0.5)),
            bool(data.get("rules", True)),
        )

    def save(self, path: Path = WEIGHTS_FILE) -> None:
        data = {
            "coef": [round(float(c), 6) for c in self.coef],
            "bias": self.bias,
            "threshold": self.threshold,
            "rules": self.rules,
        }
        path.write_text(json.dumps(data) + "\n")

    def probability(self, vectors: np.ndarray) -> np.ndarray:
        """P(suits SoT) for each row of unit-norm embeddings."""
        logits = np.asarray(vectors, dtype=np.float32) @ self.coef + self.bias
        return np.asarray(1.0 / (1.0 + np.exp(-logits)))

    def suits(self, question: str, vector: np.ndarray) -> bool:
        if self.rules and rule_says_no(question):
            return False
        return bool(self.probability(vector[None, :])[0] >= self.threshold)


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
    """A logistic regression (scikit-learn, at training time only), with its threshold
    chosen by an inner cross-validation on the same training data."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=4.0, max_iter=3000)
    model.fit(vectors, np.asarray(labels))
    weights = RouterWeights(
        model.coef_[0].astype(np.float32), float(model.intercept_[0]), 0.5, rules
    )
    threshold = _choose_threshold(questions, vectors, labels, rules=rules)
    return RouterWeights(weights.coef, weights.bias, threshold, rules)


def _choose_threshold(
    questions: Sequence[str], vectors: np.ndarray, labels: Sequence[int], *, rules: bool
) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=1)
    model = LogisticRegression(C=4.0, max_iter=3000)
    held_out = cross_val_predict(model, vectors, labels, cv=folds, method="predict_proba")[:, 1]
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
        rules: cross_validate(questions, vectors, labels, rules=rules) for rules in (False, True)
    }
    for rules, cv in scores.items():
        print(f"nested 5-fold CV, rules={rules}: {cv}")
    keep_rules = scores[True].accuracy > scores[False].accuracy
    fit(questions, vectors, labels, rules=keep_rules).save()
    print(f"wrote {WEIGHTS_FILE} from {len(rows)} labelled questions")


if __name__ == "__main__":
    main()
