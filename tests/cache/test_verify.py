"""Verifier tests: lexical guards with the real embedder, and paraphrases from mock_data."""

from __future__ import annotations

import pydantic
import pytest

from leangate.cache.embedder import Embedder
from leangate.cache.semantic_eval import default_data_dir, load_gptcache_pairs
from leangate.cache.verify import (
    AMBIGUOUS,
    ENTITIES,
    LOW_SIMILARITY,
    NEGATION,
    NUMBERS,
    QUOTED,
    Verifier,
    VerifierSettings,
)

MUST_MISS = [
    ("How do I install Python 3.11 on Ubuntu?", "How do I install Python 3.12 on Ubuntu?", NUMBERS),
    ("Is Paris the capital of France?", "Is Paris not the capital of France?", NEGATION),
    ("Who is Alice's manager?", "Who is Bob's manager?", ENTITIES),
    ("What is 12 times 7?", "What is 12 times 8?", NUMBERS),
    ("Can I delete a branch in git?", "Can't I delete a branch in git?", NEGATION),
    ("Does the train stop in Berlin?", "Does the train stop in Munich?", ENTITIES),
    ("How much is two plus three?", "How much is two plus four?", NUMBERS),
    ("What does `os.path.join` do?", "What does `os.path.split` do?", ENTITIES),
    ('What does the error "file not found" mean?', 'What does the error "disk full" mean?', QUOTED),
    ("When did World War 2 end?", "When did World War 1 end?", NUMBERS),
]

MUST_HIT = [
    ("How do I install Python 3.11 on Ubuntu?", "How can I install Python 3.11 on Ubuntu?"),
    ("Is Paris the capital of France?", "Is the capital of France Paris?"),
    ("Who is Alice's manager?", "Who manages Alice?"),
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    model = Embedder()
    model.load()
    return model


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier()


def similarity(embedder: Embedder, a: str, b: str) -> float:
    va, vb = embedder.embed([a, b])
    return float(va @ vb)


@pytest.mark.parametrize(("query", "cached", "reason"), MUST_MISS)
def test_changed_facts_are_rejected(
    embedder: Embedder, verifier: Verifier, query: str, cached: str, reason: str
) -> None:
    sim = similarity(embedder, query, cached)
    verdict = verifier.check(query, cached, sim)
    assert not verdict.accepted
    assert verdict.reason in (reason, LOW_SIMILARITY)
    assert verifier.select(query, [(cached, sim)]).index is None


@pytest.mark.parametrize(("query", "cached"), MUST_HIT)
def test_rewordings_are_accepted(
    embedder: Embedder, verifier: Verifier, query: str, cached: str
) -> None:
    verdict = verifier.check(query, cached, similarity(embedder, query, cached))
    assert verdict.accepted, verdict


def test_paraphrases_from_mock_data_are_accepted(embedder: Embedder, verifier: Verifier) -> None:
    path = default_data_dir() / "gptcache" / "mock_data.json"
    if not path.is_file():
        pytest.skip(f"public data not found at {path}")
    pairs = load_gptcache_pairs(path)[:40]
    vectors = embedder.embed([t for p in pairs for t in (p.origin, p.similar)])
    accepted = sum(
        verifier.check(p.similar, p.origin, float(vectors[2 * i] @ vectors[2 * i + 1])).accepted
        for i, p in enumerate(pairs)
    )
    assert accepted >= 0.8 * len(pairs)


def test_unrelated_question_rejected(embedder: Embedder, verifier: Verifier) -> None:
    query, cached = "How do I bake sourdough bread?", "What is the capital of Australia?"
    assert not verifier.check(query, cached, similarity(embedder, query, cached)).accepted


def test_margin_rejects_ambiguous_neighbours(verifier: Verifier) -> None:
    verdict = verifier.check("How do I sort a list?", "How do I sort a list?", 0.95, 0.94)
    assert verdict.reason == AMBIGUOUS
    assert verifier.check("How do I sort a list?", "How do I sort a list?", 0.95, 0.8).accepted


def test_select_ignores_incompatible_rivals(verifier: Verifier) -> None:
    query = "How do I install Python 3.11 on Ubuntu?"
    neighbors = [
        ("How can I install Python 3.11 on Ubuntu?", 0.95),
        ("How can I install Python 3.12 on Ubuntu?", 0.949),
    ]
    selection = verifier.select(query, neighbors)
    assert selection.index == 0
    assert selection.verdict.accepted


def test_select_prefers_compatible_lower_neighbour(verifier: Verifier) -> None:
    query = "How do I install Python 3.11 on Ubuntu?"
    neighbors = [
        ("How can I install Python 3.12 on Ubuntu?", 0.97),
        ("How can I install Python 3.11 on Ubuntu?", 0.95),
    ]
    assert verifier.select(query, neighbors).index == 1
    assert verifier.select(query, []).index is None


def test_acronyms_and_answer_particles_tolerated(verifier: Verifier) -> None:
    assert verifier.check(
        "Datasets is a library for NLP tasks.",
        "Yes, Datasets is a library for natural language processing tasks.",
        0.9,
    ).accepted


def test_settings_forbid_unknown_fields() -> None:
    with pytest.raises(pydantic.ValidationError):
        VerifierSettings.model_validate({"min_similarity": 0.8, "threshold": 0.9})
