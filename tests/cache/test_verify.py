"""Verifier tests: lexical guards with the real embedder, and paraphrases from mock_data."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from leangate.cache.embedder import Embedder, Embedding
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
    token_alignment,
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
    # The softened guards must not open these.
    ("Is Java fast?", "Is JavaScript fast?", ENTITIES),
    ("Does pandas support Python 3?", "Does pandas not support Python 3?", NEGATION),
    (
        "No alternative is mentioned in the README.",
        "An alternative is mentioned in the README.",
        NEGATION,
    ),
    ("Is the flag optional?", "Is the flag not optional?", NEGATION),
    ("What are two ways to sort a list?", "What are three ways to sort a list?", NUMBERS),
    ("How do I install numpy 2 on Ubuntu?", "How do I install numpy on Ubuntu?", NUMBERS),
    ("What does `datasets.Metric` do?", "What does `evaluate.Metric` do?", ENTITIES),
]

MUST_HIT = [
    ("How do I install Python 3.11 on Ubuntu?", "How can I install Python 3.11 on Ubuntu?"),
    ("Is Paris the capital of France?", "Is the capital of France Paris?"),
    ("Who is Alice's manager?", "Who manages Alice?"),
]

# Rewordings that only look like changed facts (from the kinds the guards used to reject).
REWORDINGS = [
    # a negation traded for a negative word
    ("What happens in the absence of a config file?", "What happens if there is no config file?"),
    ("Is the flag optional?", "Is the flag not mandatory?"),
    # not negations: "not only", "whether or not", "don't forget", an answer particle
    ("It loads not only CSV but also JSON files.", "It loads CSV and also JSON files."),
    ("Check whether the file is cached or not.", "Check whether the file is cached."),
    ("Don't forget to pass your token.", "Remember to pass your token."),
    ("No, it does not exist in version 2.10.0.", "It doesn't exist in v2.10.0."),
    # acronyms either way round, dotted names, stems, abbreviations
    ("Which JavaScript libraries talk to the Hub?", "Which JS libraries talk to the Hub?"),
    ("A platform for Machine Learning demos.", "A platform for ML demos."),
    ("The Metric datasets are loaded by load_metric.", "load_metric loads a datasets.Metric."),
    ("Save datasets to cloud storage with Python.", "Save datasets to cloud storage, Pythonic."),
    ("Store columns (e.g. floats) as JSON.", "Store columns (such as floats) as JSON."),
    # spelled-out counts one side adds, inline enumerations, plural counts
    ("There are two ways: 1) streaming 2) caching.", "You can stream or cache."),
    ("It handles thousands of audio files.", "It handles several thousand audio files."),
    # one-character code spans
    ("Use `axis` with `0` for rows and `1` for columns.", "`axis`: `0` means rows, `1` columns."),
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


@pytest.mark.parametrize(("query", "cached"), REWORDINGS)
def test_rewordings_pass_the_lexical_checks(verifier: Verifier, query: str, cached: str) -> None:
    assert verifier.lexical_reason(query, cached, 0.95) is None
    assert verifier.lexical_reason(cached, query, 0.95) is None


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


def test_select_rejects_when_an_incompatible_neighbour_is_far_closer(verifier: Verifier) -> None:
    # The query most likely rewords the first entry (its guard fired on a paraphrase); the
    # second is only loosely related, so serving it would be wrong.
    query = "How do I install Python 3.11 on Ubuntu?"
    neighbors = [
        ("How can I install Python 3.12 on Ubuntu?", 0.97),
        ("How can I install Python 3.11 on Debian?", 0.80),
    ]
    selection = verifier.select(query, neighbors)
    assert selection.index is None
    assert selection.verdict.reason == NUMBERS


def test_select_treats_format_variants_as_one_answer(verifier: Verifier) -> None:
    query = "What does `load_dataset` return?"
    neighbors = [
        ("What does `load_dataset` return?", 0.97),
        ("What does load_dataset return?", 0.969),
    ]
    assert verifier.select(query, neighbors).index == 0
    rival = [neighbors[0], ("What does `load_dataset` return exactly?", 0.969)]
    assert verifier.select(query, rival).verdict.reason == AMBIGUOUS
    # Letters of any script count: these two are different questions.
    other = [("如何安装软件?", 0.9), ("如何卸载软件?", 0.899)]
    assert verifier.select("请问如何处理软件?", other).verdict.reason == AMBIGUOUS


def test_select_low_similarity(verifier: Verifier) -> None:
    selection = verifier.select("How do I bake bread?", [("How do I bake a cake?", 0.5)])
    assert selection.index is None
    assert selection.verdict.reason == LOW_SIMILARITY


def test_token_alignment_breaks_near_ties(embedder: Embedder, verifier: Verifier) -> None:
    query = "What is the purpose of the tutorials section?"
    cached = [
        "What is the purpose of the tutorials section?",
        "What is the purpose of the reference section?",
    ]
    q, *entries = embedder.encode([query, *cached])
    assert q.tokens is not None
    aligned = [token_alignment(q.tokens, e.tokens) for e in entries if e.tokens is not None]
    assert aligned[0] == pytest.approx(1.0, abs=1e-2)
    assert aligned[0] > aligned[1] + 0.05
    neighbors = [
        (text, float(q.vector @ e.vector)) for text, e in zip(cached, entries, strict=True)
    ]
    selection = verifier.select(
        query, neighbors, query_tokens=q.tokens, neighbor_tokens=[e.tokens for e in entries]
    )
    assert selection.index == 0
    assert selection.verdict.accepted


def test_select_without_tokens_uses_the_cosine(verifier: Verifier) -> None:
    query = "How do I sort a list in Python?"
    neighbors = [("How can I sort a list in Python?", 0.95), ("How to sort a dict in Python?", 0.7)]
    plain = verifier.select(query, neighbors)
    partial = verifier.select(
        query, neighbors, query_tokens=np.ones((2, 4), np.float16), neighbor_tokens=[None, None]
    )
    assert plain == partial
    assert plain.index == 0


def test_token_alignment_of_float16_rows() -> None:
    rows = np.eye(3, 8, dtype=np.float16)
    assert token_alignment(rows, rows) == pytest.approx(1.0)
    assert token_alignment(rows[:1], rows[1:]) == pytest.approx(0.0)
    assert Embedding(np.zeros(8, dtype=np.float32)).tokens is None


def test_acronyms_and_answer_particles_tolerated(verifier: Verifier) -> None:
    assert verifier.check(
        "Datasets is a library for NLP tasks.",
        "Yes, Datasets is a library for natural language processing tasks.",
        0.9,
    ).accepted


def test_settings_forbid_unknown_fields() -> None:
    with pytest.raises(pydantic.ValidationError):
        VerifierSettings.model_validate({"min_similarity": 0.8, "threshold": 0.9})
