"""A learned judge of "may this cached question's answer serve that query?".

A logistic regression over ten features of a (query, cached question) pair that the
verifier (``cache/verify.py``) already computes: cosine, its lead over the runner-up,
surface overlaps, fact mismatches and token alignment. It is trained offline on the tuning
parts of the evaluation sets (``python -m leangate.cache.pair_train``) and shipped as
``pair_model.json``, read with numpy: no training library at run time.

Why learned: the rules' thresholds were set on GPTCache's synthetic rewrites, and on real
user questions (Quora's duplicate pairs) they serve near-topic questions too readily. One
probability, with its threshold set from a precision target, trades precision for recall
with a single knob (``VerifierSettings.min_probability``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WEIGHTS_FILE = Path(__file__).with_name("pair_model.json")
FEATURES = (
    "cosine",
    "lead_over_runner_up",
    "surface_jaccard",
    "word_trigram_jaccard",
    "query_entities_missing",
    "candidate_entities_missing",
    "numbers_differ",
    "polarity_differs",
    "token_alignment",
    "length_difference",
)
"""The features, in the order of :attr:`PairModel.coef` (see ``Verifier.pair_features``)."""


@dataclass(frozen=True)
class PairModel:
    coef: np.ndarray
    bias: float
    thresholds: dict[str, float]
    """Probability thresholds by the precision they reached on the tuning parts
    (cross-validated), for example ``{"0.95": 0.81}``."""

    @classmethod
    def load(cls, path: Path = WEIGHTS_FILE) -> PairModel:
        data = json.loads(path.read_text())
        if tuple(data["features"]) != FEATURES:
            raise ValueError(f"{path} was trained on other features: retrain it")
        return cls(
            np.asarray(data["coef"], dtype=np.float64),
            float(data["bias"]),
            {str(k): float(v) for k, v in data.get("thresholds", {}).items()},
        )

    def save(self, path: Path = WEIGHTS_FILE, **about: object) -> None:
        data = {
            "features": list(FEATURES),
            "coef": [round(float(c), 6) for c in self.coef],
            "bias": round(self.bias, 6),
            "thresholds": self.thresholds,
            **about,
        }
        path.write_text(json.dumps(data, indent=1) + "\n")

    def probability(self, features: np.ndarray) -> float:
        logit = float(np.dot(self.coef, features)) + self.bias
        return 1.0 / (1.0 + math.exp(-max(min(logit, 50.0), -50.0)))


@functools.cache
def shipped() -> PairModel:
    """The model trained on this repository's tuning data (read once)."""
    return PairModel.load()
