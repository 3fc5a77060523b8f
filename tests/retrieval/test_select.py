"""Selection: duplicates, question-aware scoring, the second hop, budgets, and protected
spans that come through byte for byte."""

from __future__ import annotations

from typing import Any

from compress_corpus import GOLD, QUESTION, SECTIONS, document, prompt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leangate.retrieval.prompt import budget, part_key, plan, rebuild, segments_by_part
from leangate.retrieval.select import Selector, SelectSettings, bridge_entities, candidates_of
from leangate.retrieval.spans import protected_spans
from leangate.retrieval.text import segment


def _count(text: str) -> int:
    return max(1, len(text.split()))


def _compress(text: str, ratio: float, **select: Any) -> str:
    messages = [{"role": "user", "content": text}]
    found = plan(messages, _count, min_block_tokens=20, instruction_max_tokens=40)
    assert found is not None
    selector = Selector(found.question, found.candidates, SelectSettings(**select))
    selector.second_hop()
    chosen = selector.choose(budget(found, _count(text), ratio=ratio))
    return str(rebuild(messages, found, chosen.keep)[0]["content"])


def test_the_second_hop_finds_the_bridge_entity() -> None:
    question = "Where did the longest-serving keeper of Marrow Point Light come from?"
    out = _compress(prompt(question), 2.0)
    assert all(sentence in out for sentence in GOLD), out
    found = plan(
        [{"role": "user", "content": prompt(question)}],
        _count,
        min_block_tokens=20,
        instruction_max_tokens=40,
    )
    assert found is not None
    selector = Selector(found.question, found.candidates, SelectSettings())
    texts = [found.candidates[i].text for i in selector.shortlist(100)]
    assert texts.index(GOLD[1]) > 6, "no word of it is in the question"
    selector.second_hop()
    texts = [found.candidates[i].text for i in selector.shortlist(100)]
    assert texts.index(GOLD[1]) < 4, "the bridge entity (Ida Venn) names its section"


def test_instruction_and_question_stay_and_order_is_kept() -> None:
    out = _compress(prompt(), 2.0)
    assert out.startswith("Answer the question from the notes below.")
    assert out.endswith(f"Question: {QUESTION}")
    positions = [out.find(s) for s in GOLD]
    assert positions == sorted(positions)
    assert "## Ida Venn\n" in out, "a kept sentence keeps its section's title"


def test_the_budget_is_honoured_within_ten_percent() -> None:
    text = prompt(repeat=1) + " " + " ".join(f"Filler fact number {i} is here." for i in range(0))
    for ratio in (2.0, 3.0):
        out = _compress(text, ratio)
        achieved = _count(text) / _count(out)
        assert ratio * 0.9 <= achieved <= ratio * 1.1 + 0.35, (ratio, achieved)


def test_repeated_passages_are_dropped_first() -> None:
    found = plan(
        [{"role": "user", "content": prompt(repeat=2)}],
        _count,
        min_block_tokens=20,
        instruction_max_tokens=40,
    )
    assert found is not None
    selector = Selector(found.question, found.candidates, SelectSettings())
    assert "dedup" in selector.method
    sentences = [i for i, c in enumerate(found.candidates) if c.segment.kind == "sentence"]
    assert sum(selector.duplicate[i] for i in sentences) == len(sentences) // 2
    assert not selector.duplicate[sentences[: len(sentences) // 2]].any()


def test_bridge_entities_are_capitalised_phrases_the_question_does_not_name() -> None:
    found = bridge_entities(
        "The longest-serving keeper of the light was Ida Venn of Castleby.", QUESTION
    )
    assert "Ida Venn of Castleby" in found or {"Ida Venn", "Castleby"} <= found
    assert "Marrow Point Light" not in found


def test_sections_take_their_titles() -> None:
    candidates = candidates_of(segment(document(SECTIONS[:2])))
    titles = {c.title for c in candidates}
    assert titles == {"Marrow Point Light", "Ida Venn"}
    assert len({c.section for c in candidates}) == 2


# --- protected spans, as a property ----------------------------------------------------------

WORDS = st.sampled_from(
    [
        "river",
        "stone",
        "bakery",
        "lantern",
        "copper",
        "meadow",
        "ticket",
        "window",
        "garden",
        "harbor",
        "pencil",
    ]
)
SENTENCE = st.lists(WORDS, min_size=3, max_size=9).map(lambda w: " ".join(w).capitalize() + ".")
HARD = st.one_of(
    st.integers(0, 999).map(lambda n: f"```\nvalue = {n}\nprint(value)\n```"),
    st.integers(0, 999).map(lambda n: f'{{"id": {n}, "ok": true, "names": ["a", "b"]}}'),
    st.integers(0, 999).map(lambda n: f"[page {n}](https://example.com/p/{n})"),
    st.integers(0, 999).map(lambda n: f"https://example.net/item?id={n}"),
    st.integers(0, 999).map(lambda n: f"<keep>Remember code {n}. Exactly.</keep>"),
)
SOFT = st.one_of(
    st.floats(0, 1e6, allow_nan=False).map(lambda x: f"{x:.2f}"),
    WORDS.map(lambda w: f'"{w.capitalize()} now. Please."'),
)


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, list[str], list[str]]:
    paragraphs, hard, soft = [], [], []
    for _ in range(draw(st.integers(3, 8))):
        sentences = draw(st.lists(SENTENCE, min_size=1, max_size=5))
        if draw(st.booleans()):
            span = draw(HARD)
            hard.append(span)
            if span.startswith("```"):
                sentences.append("\n\n" + span + "\n\n")
            else:
                sentences.insert(draw(st.integers(0, len(sentences))), f"See {span} here.")
        if draw(st.booleans()):
            span = draw(SOFT)
            soft.append(span)
            sentences.insert(0, f"It was {span} today.")
        paragraphs.append(" ".join(sentences).replace(" \n\n", "\n\n").replace("\n\n ", "\n\n"))
    return "\n\n".join(paragraphs), hard, soft


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.sampled_from([2.0, 4.0, 10.0]))
def test_protected_spans_come_through_byte_identical(
    drawn: tuple[str, list[str], list[str]], ratio: float
) -> None:
    body, hard, soft = drawn
    instruction = "Use the notes. Keep the numbers."
    question = "Question: Which garden has the copper lantern?"
    text = f"{instruction}\n\n{body}\n\n{question}"
    out = _compress(text, ratio)
    assert out.startswith(instruction + "\n\n") and out.endswith("\n\n" + question)
    for span in hard:
        assert span in out
    original = {s.text for s in segment(text)}
    spans_out = {out[s.start : s.end] for s in protected_spans(out)}
    spans_in = {text[s.start : s.end] for s in protected_spans(text)}
    for span in soft:
        sentence = f"It was {span} today."
        assert (sentence in out) == (span in spans_out), "a soft span left its sentence"
    assert spans_out <= spans_in, "compression made a span that was not there"
    for seg in segment(out):
        assert seg.kind == "heading" or seg.text in original or seg.text in text


def _chosen(text: str, ratio: float) -> tuple[list[dict[str, Any]], Any, set[int]]:
    messages = [{"role": "user", "content": text}]
    found = plan(messages, _count, min_block_tokens=20, instruction_max_tokens=40)
    assert found is not None
    selector = Selector(found.question, found.candidates, SelectSettings())
    selector.second_hop()
    return messages, found, selector.choose(budget(found, _count(text), ratio=ratio)).keep


def test_a_text_seen_before_reads_as_it_did_then_and_adds_what_is_new() -> None:
    first_messages, first, first_keep = _chosen(prompt(QUESTION), 3.0)
    before = str(rebuild(first_messages, first, first_keep)[0]["content"])
    other = "When was the Harwick museum opened, and where?"
    messages, found, keep = _chosen(prompt(other), 3.0)
    assert part_key(found, 0) == part_key(first, 0)  # the question is not part of the key
    earlier = segments_by_part(first, first_keep)
    again = str(rebuild(messages, found, keep, earlier)[0]["content"])
    document_part = before[: before.rindex("Question:")].rstrip()
    assert again.startswith(document_part), "the earlier compressed text is the prefix"
    assert "It opened in a former grain store in 1954." in again
    assert again.endswith(f"Question: {other}")
    fresh = str(rebuild(messages, found, keep)[0]["content"])
    assert not fresh.startswith(document_part), "without the memory the prefix would differ"


def test_mmr_prefers_a_new_fact_to_a_restatement() -> None:
    text = (
        "The Varell ferry leaves the harbour at noon every day.\n\n"
        "Every day at noon the Varell ferry leaves the harbour.\n\n"
        "Tickets for the Varell ferry are sold at the harbour kiosk."
    )
    candidates = candidates_of(segment(text), _count)
    question = "When does the Varell ferry leave the harbour?"
    budget = sum(sorted(c.tokens for c in candidates)[-2:])
    plain = Selector(question, candidates, SelectSettings(near_duplicate=1.0)).choose(budget)
    diverse = Selector(question, candidates, SelectSettings(near_duplicate=1.0, mmr=1.0))
    chosen = diverse.choose(budget)
    assert plain.keep == {0, 1}, "by score alone, both restatements"
    assert 2 in chosen.keep and len(chosen.keep) == 2


def test_a_budget_the_protected_text_fills_still_keeps_the_best_sentence() -> None:
    text = (
        "## Harbour\nThe Varell ferry leaves the harbour at noon. Gulls nest on the pier.\n\n"
        "## Kiosk\nTickets for the Varell ferry are sold at the kiosk."
    )
    candidates = candidates_of(segment(text), _count)
    question = "Where are tickets for the Varell ferry sold?"
    kept = Selector(question, candidates, SelectSettings()).choose(0).keep
    assert sorted(candidates[i].text for i in kept) == [
        "## Kiosk",
        "Tickets for the Varell ferry are sold at the kiosk.",
    ]
    assert not Selector(question, candidates, SelectSettings(keep_at_least=0)).choose(0).keep


def test_ranked_titles_lists_each_section_once_best_first() -> None:
    text = (
        "## Harbour\nThe Varell ferry leaves the harbour at noon. Gulls nest on the pier.\n\n"
        "## Market\nThe market opens at dawn. Fish is sold until noon.\n\n"
        "## Kiosk\nTickets for the Varell ferry are sold at the kiosk."
    )
    selector = Selector(
        "Where are tickets for the Varell ferry sold?",
        candidates_of(segment(text), _count),
        SelectSettings(),
    )
    assert selector.ranked_titles() == ["Kiosk", "Harbour", "Market"]
