"""Verifier tests: lexical guards with the real embedder, and paraphrases from mock_data's
tuning half."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from leangate.cache.embedder import Embedder, Embedding
from leangate.cache.semantic_eval import default_data_dir, load_gptcache_pairs, split_of
from leangate.cache.verify import (
    AMBIGUOUS,
    ENTITIES,
    LOW_SIMILARITY,
    NEGATION,
    NUMBERS,
    QUOTED,
    STRICT,
    UNALIGNED,
    Verifier,
    VerifierSettings,
    token_alignment,
)

# Every example here is invented for these tests: none comes from the evaluation data
# (mock_data.json, qqp_tune.json), so the held-out figures stay held out.
MUST_MISS = [
    ("How do I upgrade Postgres 14 to 15?", "How do I upgrade Postgres 14 to 16?", NUMBERS),
    ("Is Lisbon the capital of Portugal?", "Is Lisbon not the capital of Portugal?", NEGATION),
    ("Who is Carol's mentor?", "Who is Dave's mentor?", ENTITIES),
    ("What is 15 divided by 3?", "What is 15 divided by 5?", NUMBERS),
    ("Can I rename a tag in git?", "Can't I rename a tag in git?", NEGATION),
    ("Does the ferry stop in Oslo?", "Does the ferry stop in Bergen?", ENTITIES),
    ("How much is five minus two?", "How much is five minus three?", NUMBERS),
    ("What does `json.dumps` do?", "What does `json.loads` do?", ENTITIES),
    (
        'What does the warning "low battery" mean?',
        'What does the warning "weak signal" mean?',
        QUOTED,
    ),
    ("When did Apollo 11 land on the moon?", "When did Apollo 12 land on the moon?", NUMBERS),
    # The softened guards must not open these.
    ("Is Java verbose?", "Is JavaScript verbose?", ENTITIES),
    ("Does the plugin support Windows 11?", "Does the plugin not support Windows 11?", NEGATION),
    ("No refund is offered for late orders.", "A refund is offered for late orders.", NEGATION),
    ("Is the argument optional?", "Is the argument not optional?", NEGATION),
    ("What are two ways to boil an egg?", "What are three ways to boil an egg?", NUMBERS),
    ("Which steps install Redis 7 on Debian?", "Which steps install Redis on Debian?", NUMBERS),
    ("What does `requests.Session` do?", "What does `aiohttp.Session` do?", ENTITIES),
]

MUST_HIT = [
    ("How do I upgrade Postgres 14 to 15?", "How can I upgrade Postgres 14 to 15?"),
    ("Is Lisbon the capital of Portugal?", "Is the capital of Portugal Lisbon?"),
    ("Who is Carol's mentor?", "Who mentors Carol?"),
]

# Rewordings that only look like changed facts (of the kinds the guards used to reject).
REWORDINGS = [
    # a negation traded for a negative word
    (
        "Does the build change in the absence of lock files?",
        "Does the build change if there are no lock files?",
    ),
    ("Is the argument optional?", "Is the argument not mandatory?"),
    # not negations: "not only", "whether or not", "don't forget", an answer particle
    ("It reads not only XML but also YAML.", "It reads XML and also YAML."),
    ("Tell me whether the job finished or not.", "Tell me whether the job finished."),
    ("Don't forget to close the socket.", "Remember to close the socket."),
    ("No, it is not shipped in release 4.2.1.", "It isn't shipped in v4.2.1."),
    # acronyms either way round, dotted names, stems, abbreviations
    ("Which TypeScript tools lint the code?", "Which TS tools lint the code?"),
    ("A course on Natural Language Processing.", "A course on NLP."),
    (
        "The Session objects of requests come from make_session.",
        "make_session returns a requests.Session.",
    ),
    ("Export the report to cloud storage with Python.", "Export the report, Pythonic."),
    ("Store values (e.g. ints) as text.", "Store values (such as ints) as text."),
    # spelled-out counts one side adds, inline enumerations, plural counts
    ("There are two options: 1) retry 2) abort.", "You can retry or abort."),
    ("It indexes thousands of images.", "It indexes several thousand images."),
    # one-character code spans
    ("Use `mode` with `0` for read and `1` for write.", "`mode`: `0` means read, `1` write."),
    # a capitalised function word ("I") names nothing
    ("Which way of learning chess is best?", "How can I learn chess?"),
    ("Should I learn chess from books?", "Is it wise to learn chess from books?"),
]

NO_GUARDS = VerifierSettings(
    check_numbers=False, check_negation=False, check_entities=False, check_quoted=False
)


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
    # The guard itself, at a similarity no threshold would stop: it must name the reason.
    assert verifier.lexical_reason(query, cached, 1.0) == reason
    assert verifier.lexical_reason(cached, query, 1.0) == reason
    assert Verifier(NO_GUARDS).lexical_reason(query, cached, 1.0) is None
    sim = similarity(embedder, query, cached)
    assert not verifier.check(query, cached, sim).accepted
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
    pairs = [p for p in load_gptcache_pairs(path) if split_of(p.origin) == "tune"][:40]
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
    query = "How do I upgrade Postgres 14 to 15?"
    neighbors = [
        ("How can I upgrade Postgres 14 to 15?", 0.95),
        ("How can I upgrade Postgres 14 to 16?", 0.949),
    ]
    selection = verifier.select(query, neighbors)
    assert selection.index == 0
    assert selection.verdict.accepted


def test_select_prefers_compatible_lower_neighbour(verifier: Verifier) -> None:
    query = "How do I upgrade Postgres 14 to 15?"
    neighbors = [
        ("How can I upgrade Postgres 14 to 16?", 0.97),
        ("How can I upgrade Postgres 14 to 15?", 0.95),
    ]
    assert verifier.select(query, neighbors).index == 1
    assert verifier.select(query, []).index is None


def test_select_rejects_when_an_incompatible_neighbour_is_far_closer(verifier: Verifier) -> None:
    # The query most likely rewords the first entry (its guard fired on a paraphrase); the
    # second is only loosely related, so serving it would be wrong.
    query = "How do I upgrade Postgres 14 to 15?"
    neighbors = [
        ("How can I upgrade Postgres 14 to 16?", 0.97),
        ("How can I upgrade Postgres 14 to 15 on Debian?", 0.80),
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
    query = "What is the role of the glossary page?"
    cached = [
        "What is the role of the glossary page?",
        "What is the role of the appendix page?",
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
        "Redis is a store for KV data.",
        "Yes, Redis is a store for key value data.",
        0.9,
    ).accepted


def test_settings_forbid_unknown_fields() -> None:
    with pytest.raises(pydantic.ValidationError):
        VerifierSettings.model_validate({"min_similarity": 0.8, "threshold": 0.9})


def test_min_alignment_rejects_a_candidate_that_covers_too_little() -> None:
    query = "How do I learn chess openings?"
    neighbors = [("How do I learn chess?", 0.9)]
    query_tokens = np.eye(3, 8, dtype=np.float16)
    covering = [np.eye(3, 8, dtype=np.float16)]
    partial = [np.eye(3, 8, 3, dtype=np.float16)]  # no row shared with the query's
    strict = Verifier(VerifierSettings(min_alignment=0.5))
    kwargs = {"query_tokens": query_tokens}
    assert strict.select(query, neighbors, **kwargs, neighbor_tokens=covering).index == 0
    rejected = strict.select(query, neighbors, **kwargs, neighbor_tokens=partial)
    assert rejected.index is None
    assert rejected.verdict.reason == UNALIGNED
    # Unknown tokens (entries stored without them): the other rules decide alone.
    assert strict.select(query, neighbors, **kwargs, neighbor_tokens=[None]).index == 0
    assert Verifier().select(query, neighbors, **kwargs, neighbor_tokens=partial).index == 0


def test_strict_preset_is_stricter_than_the_defaults() -> None:
    defaults = VerifierSettings()
    assert STRICT.min_probability > defaults.min_probability
    assert STRICT.min_alignment >= defaults.min_alignment
    assert STRICT.min_margin >= defaults.min_margin
    assert STRICT.min_similarity >= defaults.min_similarity
