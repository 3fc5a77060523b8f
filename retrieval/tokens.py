"""Token-level pruning by self-information: drop the tokens a scorer model found most
predictable.

A token's self-information is ``-log p(token | the text before it)``, read from the
scorer's ``prompt_logprobs`` (vLLM scores a prompt without generating: ``max_tokens`` 1).
Predictable tokens (function words, the rest of a name already begun) carry the least;
dropping them shortens the prompt with the least loss, the idea behind LLMLingua's first
version. Only tokens inside the sentences a plan allows to change are dropped, never one
that overlaps a protected span (numbers, quoted strings, labels, code, links: see
``spans.py``), holds a line break, or opens the text (it has no score).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .spans import Span


@dataclass(frozen=True, slots=True)
class Piece:
    """One token of the scored text: ``text[start:end]`` and its self-information."""

    start: int
    end: int
    surprisal: float


def scoring_body(text: str, model: str) -> dict[str, Any]:
    """A ``/v1/completions`` request that only scores ``text``."""
    return {
        "model": model,
        "prompt": text,
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 0,
    }


def pieces_of(text: str, answer: Mapping[str, Any]) -> list[Piece] | None:
    """``text``'s tokens with their self-information, from the scorer's answer; None when
    the tokens do not spell ``text`` back (a character split across tokens, a tokenizer
    that rewrites whitespace): then nothing is pruned."""
    try:
        scored = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(scored, list) or len(scored) < 2:
        return None
    tokens: list[tuple[str, float]] = []
    for entry in scored[1:]:  # the first token has no context, hence no score
        if not isinstance(entry, Mapping) or len(entry) != 1:
            return None
        (chosen,) = entry.values()
        if not isinstance(chosen, Mapping):
            return None
        decoded, logprob = chosen.get("decoded_token"), chosen.get("logprob")
        if not isinstance(decoded, str) or not isinstance(logprob, int | float):
            return None
        tokens.append((decoded, -float(logprob)))
    rest = "".join(decoded for decoded, _ in tokens)
    if not rest or not text.endswith(rest) or "\ufffd" in rest:
        return None
    first_end = len(text) - len(rest)
    out = [Piece(0, first_end, math.inf)] if first_end else []
    position = first_end
    for decoded, surprisal in tokens:
        out.append(Piece(position, position + len(decoded), surprisal))
        position += len(decoded)
    return out


def prune(
    text: str,
    pieces: Sequence[Piece],
    regions: Sequence[tuple[int, int]],
    spans: Sequence[Span],
    share: float,
    counted: Sequence[tuple[int, int]] | None = None,
) -> tuple[str, int]:
    """``text`` without its least informative words: words inside ``regions`` (character
    ranges that may change) go until about ``share`` of the tokens inside ``counted``
    (default ``regions``) have gone, fewer when too few may. ``counted`` can be wider than
    ``regions``: headings the share was promised over but that must stay make more of the
    sentences go. Whole words go, never a piece of one (a word's information is its
    tokens' sum). Returns the text and the number of tokens dropped."""
    words = [
        w
        for w in _words(text, pieces)
        if _inside(w, regions) and not _touches(w, spans) and _droppable(text[w.start : w.end])
    ]
    eligible = sum(1 for p in pieces if _inside(p, regions if counted is None else counted))
    wanted = int(share * eligible)
    dropped: list[_Word] = []
    count = 0
    for word in sorted(words, key=lambda w: w.surprisal):
        if count >= wanted:
            break
        dropped.append(word)
        count += word.tokens
    if not dropped:
        return text, 0
    kept: list[str] = []
    cursor = 0
    for word in sorted(dropped, key=lambda w: w.start):
        if word.start > cursor:
            kept.append(text[cursor : word.start])
        cursor = max(cursor, word.end)
        line_start = not kept or kept[-1].endswith("\n")
        if line_start and text[cursor : cursor + 1] == " ":
            cursor += 1  # the dropped words opened a line: the next one does, without a space
    kept.append(text[cursor:])
    return "".join(kept), count


@dataclass(frozen=True, slots=True)
class _Word:
    start: int
    end: int
    surprisal: float
    tokens: int


def _words(text: str, pieces: Sequence[Piece]) -> list[_Word]:
    """Runs of pieces that make one word: a piece opens a new word after a space or
    punctuation, or when it starts with one."""
    words: list[_Word] = []
    run: list[Piece] = []
    for piece in pieces:
        if run and not (text[piece.start].isalnum() and text[run[-1].end - 1].isalnum()):
            words.append(_word(run))
            run = []
        run.append(piece)
    if run:
        words.append(_word(run))
    return words


def _word(run: Sequence[Piece]) -> _Word:
    return _Word(run[0].start, run[-1].end, sum(p.surprisal for p in run), len(run))


def _inside(item: Piece | _Word, regions: Sequence[tuple[int, int]]) -> bool:
    return any(start <= item.start and item.end <= end for start, end in regions)


def _touches(item: Piece | _Word, spans: Sequence[Span]) -> bool:
    return any(s.start < item.end and item.start < s.end for s in spans)


def _droppable(token: str) -> bool:
    """Words and word pieces, not whitespace alone, line breaks or punctuation (which keeps
    sentences apart and numbers readable)."""
    word = token.strip()
    return bool(word) and "\n" not in token and any(c.isalnum() for c in word)
