"""Question-aware selection of the sentences of a long context that fit a token budget.

The pieces compose, in this order:

1. **Duplicates**: a sentence whose normalised text was already seen, and a whole section
   (a paragraph or a heading's sentences) whose word trigrams overlap an earlier section's
   by ``near_duplicate`` Jaccard or more, are never chosen.
2. **First pass**: BM25 (the ``bm25s`` library) of the question against each sentence
   (with its section's title, which names what "he" or "it" refers to) and against each
   whole section; a bonus for the first sentence of a section (it usually introduces the
   subject) and for sections whose title the question names. Dense scores from the shared
   sentence embedder can be added (``add_dense``).
3. **Second hop**: multi-hop questions ("the director of the film that ...") need
   sentences that share no word with the question. The best sentences of the first pass
   name *bridge entities* (capitalised phrases, and their sections' titles); they re-query
   the context, and sections whose title one of them names get a bonus.
4. **Fill**: hard sentences (protected spans that must stay) first, then the best ones
   while they fit; a section's heading is kept with its first chosen sentence. Chosen
   sentences stay in their original order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import bm25s
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .text import Segment

WORD = re.compile(r"[A-Za-z0-9]+(?:'[a-z]+)?")
NAME_WORD = r"(?:[A-Z]\.|[A-Z][\w'\u2019-]*|[0-9]+)"
CAPITALISED = re.compile(
    rf"\b[A-Z][\w'\u2019-]*(?:[ \t]+(?:(?:of|the|de|von|van|and|&|for|in)[ \t]+)?{NAME_WORD})*"
)
PARENTHETICAL = re.compile(r"\s*\([^)]*\)\s*$")
_STOPWORD_TEXT = """a an the and or but if of at by for with about against between into through
    during before after above below to from up down in out on off over under again further then once
    here there when where why how all any both each few more most other some such no nor not
    only own same so than too very can will just should now is are was were be been being
    have has had having do does did doing i me my we our you your he him his she her it its
    they them their what which who whom this that these those am as until while also would
    could may might must shall one"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
ENTITY_STOP = frozenset({"the", "a", "an", "he", "she", "it", "they", "his", "her", "in", "on"})


class SelectSettings(BaseModel):
    """Weights of the scores; tuned on the tune half of the HotpotQA sample only."""

    model_config = ConfigDict(extra="forbid")

    sentence_weight: float = Field(1.0, ge=0)
    """Weight of a sentence's own BM25 score against the question."""
    section_weight: float = Field(1.0, ge=0)
    """Weight of its section's BM25 score."""
    lead_bonus: float = Field(0.25, ge=0)
    """Bonus of a section's lead sentence."""
    title_bonus: float = Field(0.5, ge=0)
    """A section whose title the question names."""
    dense_weight: float = Field(0.5, ge=0)
    """Weight of dense (embedding) scores, when they are computed."""
    hop_sources: int = Field(2, ge=0, le=10)
    """Best first-pass sentences whose entities re-query the context (0: no second hop)."""
    hop_weight: float = Field(0.6, ge=0)
    """Weight of the second hop's scores."""
    bridge_bonus: float = Field(2.0, ge=0)
    """A section whose title a bridge entity names."""
    mmr: float = Field(0.0, ge=0)
    """Maximal marginal relevance: the weight of a candidate's word overlap with what was
    already kept, against its score (0: pure score order)."""
    near_duplicate: float = Field(0.7, gt=0, le=1)
    """Word-trigram Jaccard at which a section counts as a repeat of an earlier one."""
    keep_at_least: int = Field(1, ge=0)
    """The best candidates kept even past the budget. When the protected text alone fills
    the target, a budget of 0 would otherwise send the question without any of its
    context, which is never what the caller wants from a shorter prompt."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A segment of compressible text, with what selection needs to know about it."""

    segment: Segment
    section: int
    title: str
    tokens: int

    @property
    def text(self) -> str:
        return self.segment.text


@dataclass
class Selection:
    keep: set[int]
    tokens: int
    duplicates: int
    method: list[str] = field(default_factory=list)


def candidates_of(
    segments: Sequence[Segment],
    count: Callable[[str], int] | None = None,
    section_base: int = 0,
) -> list[Candidate]:
    """Attach sections and titles to one text's segments. A heading opens a section; so
    does a paragraph break, unless the paragraph before held only headings."""
    out: list[Candidate] = []
    section = section_base - 1
    title = ""
    paragraph = -1
    after_heading = False
    for seg in segments:
        if seg.kind == "heading":
            if not after_heading:
                section += 1
            title = _title_of(seg.text)
        elif seg.paragraph != paragraph and not after_heading:
            section += 1
            title = ""
        after_heading = seg.kind == "heading"
        paragraph = seg.paragraph
        tokens = count(seg.text) if count is not None else _rough_tokens(seg.text)
        out.append(Candidate(seg, section, title, tokens))
    return out


def _title_of(heading: str) -> str:
    return heading.lstrip("#").strip().rstrip(":").strip()


def _rough_tokens(text: str) -> int:
    return max(1, round(len(text) / 4))


def words(text: str) -> list[str]:
    """Lower-cased content words, lightly stemmed (plural endings)."""
    out = []
    for raw in WORD.findall(text):
        word = raw.lower()
        if word in STOPWORDS or (len(word) < 2 and not word.isdigit()):
            continue
        if len(word) > 4 and word.endswith("ies"):
            word = word[:-3] + "y"
        elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


class Selector:
    """One selection: score, optionally add dense scores, hop, then fill a budget."""

    def __init__(
        self, question: str, candidates: Sequence[Candidate], settings: SelectSettings
    ) -> None:
        self.question = question
        self.candidates = list(candidates)
        self.settings = settings
        self.method: list[str] = []
        count = len(self.candidates)
        self.scores = np.zeros(count, dtype=np.float64)
        self.scorable = np.array(
            [c.segment.kind == "sentence" and not c.segment.hard for c in self.candidates],
            dtype=bool,
        )
        self.duplicate = self._duplicates()
        own = [words(c.text) for c in self.candidates]
        titles = {title: words(title) for title in {c.title for c in self.candidates}}
        self._sentence_index = _Index([titles[c.title] + own[i] for i, c in enumerate(candidates)])
        self._sections = sorted({c.section for c in self.candidates})
        self._section_index = _Index(self._section_words(own, titles))
        self._first_pass()

    # --- duplicates ---------------------------------------------------------------------------

    def _duplicates(self) -> np.ndarray:
        duplicate = np.zeros(len(self.candidates), dtype=bool)
        seen: set[str] = set()
        shingles: dict[int, set[tuple[str, ...]]] = {}
        for i, c in enumerate(self.candidates):
            if c.segment.kind != "sentence":
                continue
            tokens = WORD.findall(c.text.lower())
            shingles.setdefault(c.section, set()).update(
                tuple(tokens[n : n + 3]) for n in range(max(len(tokens) - 2, 0))
            )
            if c.segment.hard:
                continue
            key = " ".join(tokens)
            if key in seen:
                duplicate[i] = True
            seen.add(key)
        repeated = _near_duplicate_sections(shingles, self.settings.near_duplicate)
        for i, c in enumerate(self.candidates):
            if c.section in repeated and not c.segment.hard:
                duplicate[i] = True
        if duplicate.any():
            self.method.append("dedup")
        return duplicate

    # --- scoring ------------------------------------------------------------------------------

    def _section_words(
        self, own: list[list[str]], titles: Mapping[str, list[str]]
    ) -> list[list[str]]:
        """Each section's words: its title's (its first member's), then its sentences'."""
        by_section: dict[int, list[str]] = {}
        for i, c in enumerate(self.candidates):
            if c.section not in by_section:
                by_section[c.section] = list(titles[c.title])
            if c.segment.kind != "heading":
                by_section[c.section].extend(own[i])
        return [by_section[s] for s in self._sections]

    def _first_pass(self) -> None:
        s = self.settings
        query = words(self.question)
        sentence = _normalised(self._sentence_index.scores(query))
        section = _normalised(self._section_index.scores(query))
        by_section = dict(zip(self._sections, section, strict=True))
        asked = _normal_title_text(self.question)
        leads = self._leads()
        for i, c in enumerate(self.candidates):
            title = _core_title(c.title)
            named = bool(title) and f" {title} " in asked
            self.scores[i] = (
                s.sentence_weight * sentence[i]
                + s.section_weight * by_section[c.section]
                + s.lead_bonus * (i in leads)
                + s.title_bonus * named
            )
        self.method.append("bm25")

    def _leads(self) -> set[int]:
        leads: dict[int, int] = {}
        for i, c in enumerate(self.candidates):
            if c.segment.kind == "sentence":
                leads.setdefault(c.section, i)
        return set(leads.values())

    def add_dense(self, indices: Sequence[int], similarities: Sequence[float]) -> None:
        """Add the embedder's cosine similarities of some candidates to the question."""
        if not indices:
            return
        values = np.asarray(similarities, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        spread = high - low if high > low else 1.0
        for i, value in zip(indices, values, strict=True):
            self.scores[i] += self.settings.dense_weight * (value - low) / spread
        self.method.append("dense")

    def shortlist(self, size: int) -> list[int]:
        """The best scorable candidates so far (for the costly dense scores)."""
        order = self._ranked()
        return order[:size]

    def _ranked(self) -> list[int]:
        usable = self.scorable & ~self.duplicate
        order = sorted(np.flatnonzero(usable), key=lambda i: -self.scores[i])
        return [int(i) for i in order]

    def second_hop(self) -> None:
        s = self.settings
        sources = self._best_per_section(s.hop_sources)
        if not sources:
            return
        source_text = " ".join(self.candidates[i].text for i in sources)
        entities = bridge_entities(source_text, self.question)
        entities |= {self.candidates[i].title for i in sources if self.candidates[i].title}
        if not entities:
            return
        hop = _normalised(self._sentence_index.scores(words(" ".join(sorted(entities)))))
        named = _Names(source_text, entities)
        by_source = [
            (self.candidates[i].section, _Names(self.candidates[i].text, ())) for i in sources
        ]
        source_sections = {section for section, _ in by_source}
        for i, c in enumerate(self.candidates):
            if c.section in source_sections:  # a bridge only if another source names it
                bridged = any(sec != c.section and n.names(c.title) for sec, n in by_source)
            else:
                bridged = named.names(c.title)
            self.scores[i] += s.hop_weight * hop[i] + s.bridge_bonus * bridged
        self.method.append("hop")

    def ranked_titles(self) -> list[str]:
        """The candidates' titles, each once, by its best sentence: which documents this
        selection would draw on first."""
        return list(dict.fromkeys(self.candidates[i].title for i in self._ranked()))

    def _best_per_section(self, count: int) -> list[int]:
        best: list[int] = []
        sections: set[int] = set()
        for i in self._ranked():
            if self.candidates[i].section not in sections:
                best.append(i)
                sections.add(self.candidates[i].section)
                if len(best) == count:
                    break
        return best

    # --- filling ------------------------------------------------------------------------------

    def choose(self, budget: int, chosen: Iterable[int] = ()) -> Selection:
        """Hard candidates and ``chosen`` ones (an earlier selection's), then the best ones
        while they fit in ``budget`` tokens (the first ``keep_at_least`` whether or not
        they fit)."""
        keep: set[int] = set()
        used = 0
        headings = self._headings()
        already = set(chosen)
        for i, c in enumerate(self.candidates):
            if c.segment.hard or i in already:
                keep.add(i)
                used += c.tokens
        picked = sum(1 for i in already if not self.candidates[i].segment.hard)
        for i in self._order(keep):
            heading = headings.get(self.candidates[i].section)
            extra = (
                self.candidates[heading].tokens
                if heading is not None and heading not in keep
                else 0
            )
            cost = self.candidates[i].tokens + extra
            if used + cost > budget and picked >= self.settings.keep_at_least:
                continue
            keep.add(i)
            used += cost
            picked += 1
            if heading is not None:
                keep.add(heading)
        for i in list(keep):
            heading = headings.get(self.candidates[i].section)
            if heading is not None and heading not in keep:
                keep.add(heading)
                used += self.candidates[heading].tokens
        return Selection(keep, used, int(self.duplicate.sum()), list(self.method))

    def _order(self, keep: set[int]) -> Iterator[int]:
        """The ranked candidates; with ``mmr``, each next one is the best after a penalty
        for its word overlap (Jaccard) with the most similar one kept so far: maximal
        marginal relevance, against context that says the same thing twice. ``keep`` is
        the caller's, read as it grows."""
        ranked = self._ranked()
        weight = self.settings.mmr
        if not weight or not ranked:
            yield from ranked
            return
        bags = {i: set(words(self.candidates[i].text)) for i in ranked}
        top = max(float(self.scores[ranked[0]]), 1e-9)
        overlap = dict.fromkeys(ranked, 0.0)
        counted: set[int] = set()
        remaining = list(ranked)
        while remaining:
            for kept in keep - counted:
                if kept in bags:
                    for i in remaining:
                        overlap[i] = max(overlap[i], _jaccard(bags[i], bags[kept]))
            counted |= keep
            best = max(remaining, key=lambda i: self.scores[i] / top - weight * overlap[i])
            remaining.remove(best)
            yield best

    def _headings(self) -> dict[int, int]:
        """Each section's heading (the last one, when several open it)."""
        return {c.section: i for i, c in enumerate(self.candidates) if c.segment.kind == "heading"}


class _Index:
    """BM25 over word lists; an empty corpus or query scores zero."""

    def __init__(self, corpus: list[list[str]]) -> None:
        self.size = len(corpus)
        self.vocabulary = {w for doc in corpus for w in doc}
        self.model: bm25s.BM25 | None = None
        if self.vocabulary:
            self.model = bm25s.BM25()
            self.model.index([doc or [""] for doc in corpus], show_progress=False)

    def scores(self, query: Iterable[str]) -> np.ndarray:
        known = sorted({w for w in query if w in self.vocabulary})
        if self.model is None or not known:
            return np.zeros(self.size, dtype=np.float64)
        return np.asarray(self.model.get_scores(known), dtype=np.float64)


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def _normalised(values: np.ndarray) -> np.ndarray:
    high = float(values.max()) if values.size else 0.0
    return values / high if high > 0 and math.isfinite(high) else np.zeros_like(values)


def _near_duplicate_sections(
    shingles: Mapping[int, set[tuple[str, ...]]], threshold: float
) -> set[int]:
    repeated: set[int] = set()
    kept: list[tuple[int, set[tuple[str, ...]]]] = []
    for section in sorted(shingles):
        grams = shingles[section]
        if len(grams) < 3:
            continue
        if any(len(grams & other) / len(grams | other) >= threshold for _, other in kept):
            repeated.add(section)
        else:
            kept.append((section, grams))
    return repeated


class _Names:
    """Does a text (and its entities) name a section's title? By the whole title, or by a
    person's surname ("Nixon" names "Richard Nixon")."""

    def __init__(self, text: str, entities: Iterable[str]) -> None:
        self.said = _normal_title_text(text + " " + " ".join(sorted(entities)))
        self.single = {e.lower() for e in entities if " " not in e and len(e) >= 4}

    def names(self, title: str) -> bool:
        core = _core_title(title)
        if not core:
            return False
        return f" {core} " in self.said or (" " in core and core.rsplit(" ", 1)[1] in self.single)


def bridge_entities(text: str, question: str) -> set[str]:
    """Capitalised phrases of ``text`` that the question does not already name."""
    asked = _normal_title_text(question)
    found = set()
    for m in CAPITALISED.finditer(text):
        phrase = m.group().strip(" .,'\u2019-")
        words_ = phrase.split()
        while words_ and words_[0].lower() in ENTITY_STOP:
            words_ = words_[1:]
        phrase = " ".join(words_)
        if len(phrase) < 3 or f" {_core_title(phrase)} " in asked:
            continue
        found.add(phrase)
    return found


def _core_title(title: str) -> str:
    """A title without its disambiguation ("Marrow Point (lighthouse)" names "marrow point")."""
    return " ".join(WORD.findall(PARENTHETICAL.sub("", title).lower()))


def _normal_title_text(text: str) -> str:
    return f" {' '.join(WORD.findall(text.lower()))} "
