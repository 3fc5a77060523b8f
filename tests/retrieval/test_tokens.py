"""Token-level pruning (``retrieval/tokens.py``): reading the scorer's answer and dropping
the least informative words, never a protected one."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from leangate.retrieval.spans import protected_spans
from leangate.retrieval.tokens import Piece, pieces_of, prune, scoring_body


def _answer(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    """A ``/v1/completions`` answer as vLLM gives it: the first token unscored."""
    scored: list[Any] = [None]
    for n, (token, logprob) in enumerate(zip(tokens[1:], logprobs[1:], strict=True)):
        scored.append({str(n): {"logprob": logprob, "rank": 1, "decoded_token": token}})
    return {"choices": [{"prompt_logprobs": scored}]}


def test_the_scoring_request_asks_for_prompt_logprobs_only() -> None:
    body = scoring_body("Some text.", "m")
    assert (
        body["prompt_logprobs"] == 0 and body["max_tokens"] == 1 and body["prompt"] == "Some text."
    )


def test_pieces_spell_the_text_back_with_their_surprisal() -> None:
    tokens = ["The", " ferry", " leaves", " at", " noon", "."]
    pieces = pieces_of("The ferry leaves at noon.", _answer(tokens, [0, -9, -4, -1, -6, -2]))
    assert pieces is not None
    assert [(p.start, p.end) for p in pieces] == [
        (0, 3),
        (3, 9),
        (9, 16),
        (16, 19),
        (19, 24),
        (24, 25),
    ]
    assert pieces[0].surprisal == math.inf and pieces[3].surprisal == 1


def test_tokens_that_do_not_spell_the_text_give_nothing() -> None:
    assert pieces_of("The ferry.", _answer(["The", " boat", "."], [0, -1, -1])) is None
    assert pieces_of("The ferry.", {"choices": [{"prompt_logprobs": None}]}) is None
    assert pieces_of("The ferry.", {"choices": []}) is None
    split = _answer(["The", " caf", "\ufffd"], [0, -1, -1])
    assert pieces_of("The caf\ufffd", split) is None


def _scored(text: str, surprisal: dict[str, float]) -> list[Piece]:
    """One piece per word or punctuation mark, scored by ``surprisal`` (default 5)."""
    pieces = []
    position = 0
    for word in text.replace(".", " .").split(" "):
        start = text.index(word, position)
        end = start + len(word)
        pieces.append(Piece(position, end, surprisal.get(word, 5.0)))
        position = end
    return [Piece(pieces[0].start, pieces[0].end, math.inf), *pieces[1:]]


def test_the_most_predictable_words_go_first_and_protected_ones_stay() -> None:
    text = "Ferries leave the old harbour at 12 on most days of the week."
    pieces = _scored(text, {"the": 0.1, "12": 0.0, "of": 0.2, "most": 0.3, "old": 9})
    out, dropped = prune(text, pieces, [(0, len(text))], protected_spans(text), 0.25)
    assert dropped == 3
    assert out == "Ferries leave old harbour at 12 on most days week."


def test_only_the_regions_change() -> None:
    text = "Keep the first part. Thin the second part."
    pieces = _scored(text, {"the": 0.1, "first": 1, "second": 1, "part": 9})
    middle = text.index("Thin")
    out, _ = prune(text, pieces, [(middle, len(text))], [], 0.4)
    assert out.startswith("Keep the first part. ") and "the second" not in out


def test_a_heading_that_stays_makes_more_of_the_sentences_go() -> None:
    """The share is promised over the heading too; the heading cannot go, so the
    sentences give its part."""
    text = "## Ferry Timetable Notes\nThe ferry leaves the harbour at noon of most days."
    pieces = _scored(text, {"the": 0.1, "of": 0.2, "most": 0.3, "at": 0.4, "ferry": 9})
    sentence = [(text.index("The"), len(text))]
    _, alone = prune(text, pieces, sentence, [], 0.25)
    _, wider = prune(text, pieces, sentence, [], 0.25, counted=[(0, len(text))])
    assert wider > alone
    assert wider >= int(0.25 * len(pieces))


words = st.sampled_from(["alpha", "beta", "the", "of", "42", "3.5", '"quoted words"', "x"])


@given(
    st.lists(words, min_size=2, max_size=30),
    st.lists(st.floats(0, 20), min_size=30, max_size=30),
    st.floats(0.05, 0.95),
)
def test_protected_spans_come_through_whole(
    chosen: list[str], surprisals: list[float], share: float
) -> None:
    text = " ".join(chosen) + "."
    pieces = []
    position = 0
    for n, word in enumerate(chosen):
        start = position + (1 if n else 0)
        pieces.append(Piece(position, start + len(word), math.inf if n == 0 else surprisals[n]))
        position = start + len(word)
    pieces.append(Piece(position, position + 1, 1.0))
    spans = protected_spans(text)
    out, _ = prune(text, pieces, [(0, len(text))], spans, share)
    for span in spans:
        assert text[span.start : span.end] in out
    kept = out.rstrip(".").split()
    source = text.rstrip(".").split()
    it = iter(source)
    assert all(word in it for word in kept), "words are dropped, never changed or moved"


def test_a_line_never_starts_with_the_space_of_a_dropped_word() -> None:
    text = "## Bay\nThe bay is calm."
    pieces = [
        Piece(0, 2, math.inf),
        Piece(2, 6, 9),
        Piece(6, 7, 9),
        Piece(7, 10, 0.1),
        Piece(10, 14, 0.2),
        Piece(14, 17, 9),
        Piece(17, 22, 9),
        Piece(22, 23, 9),
    ]
    out, dropped = prune(text, pieces, [(7, len(text))], [], 0.4)
    assert (out, dropped) == ("## Bay\nis calm.", 2)
