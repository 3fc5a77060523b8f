"""Hit verification for the semantic cache.

A cosine threshold alone cannot tell "install Python 3.11" from "install Python 3.12", or a
question from its negation: MiniLM puts such pairs above 0.9. Nor can it pick between two cached
near-duplicates. :meth:`Verifier.select` therefore serves a neighbour only when

1. the lexical "facts" of query and candidate agree: numbers, polarity (negation), names and
   other proper nouns, code identifiers and quoted strings. A paraphrase rewords; it does not
   change these. Each check looks both ways: the cached answer may rely on a detail the query
   lacks and vice versa. Rewordings that only look like changed facts are tolerated: acronyms
   spelled out ("ML" / "machine learning", "JS" / "JavaScript"), "datasets.Metric" / "Metric",
   a spelled-out count one side adds ("two methods"), a negation traded for a negative word
   ("in the absence of" / "if there is no"), "not only", "whether or not", "don't forget";
2. among the compatible neighbours, the best one by ``score`` = cosine + ``token_weight`` x
   token alignment + ``surface_weight`` x character-trigram Jaccard of the raw texts has a
   cosine of at least ``min_similarity``. Token alignment is the mean, over the query's content
   tokens, of the best cosine with any content token of the candidate (MiniLM's own contextual
   token embeddings, from the forward pass that makes the sentence vector): it rewards the
   candidate that covers what the query says, which the pooled vector blurs;
3. it beats every other compatible neighbour by ``min_margin`` on that score, unless those
   rivals are the same text up to case and punctuation (then they are one answer). When two
   cached entries are about equally close the cache cannot know which one the user meant, so
   it misses. Neighbours that fail the lexical checks are not rivals ("Python 3.12" does not
   make "Python 3.11" ambiguous), but
4. no lexically incompatible neighbour is more than ``max_rejected_lead`` closer (cosine) than
   the chosen one: then the query most likely rewords *that* entry, and the guard that
   rejected it fired on a paraphrase rather than a changed fact, so a lesser neighbour is no
   safe answer either.

Lexical checks are regex and set operations on short strings; the features of cached texts are
memoised. Token alignment is one small matrix product per neighbour. Verifying k=4 neighbours
costs well under a millisecond.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .pair_model import shipped

# Reasons reported in Verdict.reason (stable strings: they may end up as metric labels).
ACCEPTED = "accepted"
NO_CANDIDATE = "no_candidate"
LOW_SIMILARITY = "low_similarity"
AMBIGUOUS = "ambiguous"
NUMBERS = "numbers"
NEGATION = "negation"
ENTITIES = "entities"
QUOTED = "quoted"
UNALIGNED = "unaligned"
IMPROBABLE = "improbable"


class VerifierSettings(BaseModel):
    """Verifier knobs; the rules' defaults were tuned on the tuning half of GPTCache's
    mock_data.json.

    Chosen by grid search for the highest tuning-half recall at precision >= 0.995 with no
    unrelated question served (see :mod:`leangate.cache.semantic_eval`). On Quora's
    duplicate pairs (real user questions) those rules serve near-topic questions too
    readily, so by default the learned pair model (``cache/pair_model.py``, trained on the
    tuning parts of both sets) must also find the chosen entry at least 0.47 likely to
    answer the query: its cross-validated 0.9-precision point. On the tuning parts that
    removed a third of QQP's cross-pair false hits for 1.6 points of QQP recall and 0.2 of
    mock_data's. :data:`STRICT` offers the precise end.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_similarity: float = Field(default=0.65, ge=-1.0, le=1.0)
    """The chosen neighbour's cosine similarity must reach this."""
    min_margin: float = Field(default=0.08, ge=0.0, le=4.0)
    """The chosen neighbour must beat every other compatible one by this much score (else the
    question is ambiguous: a miss)."""
    token_weight: float = Field(default=0.75, ge=0.0, le=2.0)
    """Weight of token alignment (how much of the query the candidate covers) in the score."""
    surface_weight: float = Field(default=0.2, ge=0.0, le=2.0)
    """Weight of the raw texts' character-trigram Jaccard in the score."""
    trigram_weight: float = Field(default=0.0, ge=0.0, le=2.0)
    """Weight of word-trigram Jaccard (lower-cased words); superseded by ``surface_weight``,
    kept for configs."""
    max_rejected_lead: float = Field(default=0.05, ge=0.0, le=2.0)
    """A neighbour the fact checks rejected may be at most this much closer (cosine) than the
    chosen one; further ahead, the query likely rewords it and nothing is served."""
    min_alignment: float = Field(default=0.0, ge=0.0, le=1.0)
    """The chosen entry's token alignment, the lower of both directions, must reach this: each
    text must cover what the other says (0 turns the check off)."""
    min_probability: float = Field(default=0.47, ge=0.0, le=1.0)
    """The learned pair model's (``cache/pair_model.py``) probability that the chosen entry
    answers the query must reach this (0 turns the model off)."""
    check_numbers: bool = True
    """Numbers must agree."""
    check_negation: bool = True
    """Polarity must agree (a question and its negation never match)."""
    check_entities: bool = True
    """Names, other proper nouns and code identifiers must agree."""
    check_quoted: bool = True
    """Quoted strings must agree."""


# The strictest operating point found on QQP's tuning part (see
# :mod:`leangate.cache.semantic_eval`): the highest recall there at precision >= 0.99 with at
# most 1% of cross-pair negatives served, keeping precision >= 0.99 on mock_data's tuning half.
# It gives up much recall (QQP tune 0.49, mock_data tune 0.58, against 0.70 and 0.85 by
# default); many of the hits it refuses are duplicates that QQP leaves unlabelled (read by eye
# on the tuning part). A preset for policies that value precision above all. (Before the pair
# model, the rules alone reached the same precision at recall 0.30.)
STRICT = VerifierSettings(min_probability=0.94)
RULES_ONLY = VerifierSettings(min_probability=0.0)
"""The rules without the pair model (the default before it), for comparison."""


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    similarity: float
    reason: str


@dataclass(frozen=True)
class Selection:
    """Outcome of :meth:`Verifier.select`: ``index`` is the chosen neighbour (or None)."""

    index: int | None
    verdict: Verdict


@dataclass(frozen=True)
class TextFeatures:
    """The lexical facts of one text that a paraphrase must preserve."""

    words: frozenset[str]
    content: frozenset[str]
    numbers: frozenset[str]  # written with digits (or as a plural count word, "thousands")
    number_words: frozenset[str]  # spelled out only ("two methods"), normalised to digits
    negated: bool
    negative_cues: frozenset[str]  # negative words that are no negation ("without", "deprecated")
    entities: frozenset[str]
    quoted: tuple[str, ...]
    lowered: str
    canonical: str  # lower-cased letters and digits only: equal for texts differing in format
    surface: frozenset[str]  # character trigrams of the raw text (case and punctuation kept)
    tokens: tuple[str, ...]  # raw words, for the rarely needed (lazy) features below
    stripped: str

    @cached_property
    def acronyms(self) -> frozenset[str]:
        """Initials of every 2..5-word run, CamelCase split ("machine learning" -> "ml")."""
        return frozenset(_initials(_split_camel(self.stripped)))

    @cached_property
    def trigrams(self) -> frozenset[str]:
        """Character trigrams of the lower-cased words."""
        return _trigrams(" ".join(t.lower() for t in self.tokens))


_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.'\-]*[A-Za-z0-9_]|[A-Za-z0-9_]")
_APOSTROPHE = "\u2019"  # typographic apostrophe, folded to "'" before tokenising
_NUMBER = re.compile(r"(?:(?<![A-Za-z_])|(?<=\bv))\d+(?:[.,:/]\d+)*")  # "v2.10" is 2.10
_VERSION = re.compile(r"v\d+(?:\.\d+)*")
_LIST_MARKER = re.compile(r"(?m)^\s*\d{1,2}[.)]\s+")
# "Yes, ..." / "No. ..." only: in "No alternative is mentioned" the "No" is a real negation.
_ANSWER_PARTICLE = re.compile(r"^\s*(?:yes|no)\b[,.!:;]\s*", re.IGNORECASE)
_QUOTED = re.compile(r"`([^`]{1,80})`|\"([^\"]{2,80})\"|“([^”]{2,80})”")
# "1) ... 2) ..." enumerations inside a sentence (not "f(1)").
_INLINE_MARKER = re.compile(r"(?<![\w(\[])\d{1,2}\)\s")
_OPENERS = " \t\"'(`*-\u201c"  # may sit between a sentence end and its first word

_NEGATIONS = frozenset(
    {
        "not",
        "no",
        "never",
        "none",
        "nobody",
        "nothing",
        "neither",
        "nor",
        "nowhere",
        "cannot",
    }
)
_NUMBER_WORDS = {
    "zero": "0",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "twenty": "20",
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "hundred": "100",
    "thousand": "1000",
    "million": "1000000",
    "billion": "1000000000",
    "hundreds": "100",
    "thousands": "1000",
    "millions": "1000000",
    "billions": "1000000000",
}
# Negative words that are not negations. A paraphrase may trade one for a negation ("in the
# absence of X" / "if there is no X", "deprecated" / "no longer available"), so a polarity
# mismatch is forgiven when the side without a negation has one of these.
_NEGATIVE_CUES = frozenset(
    {
        "without",
        "absence",
        "absent",
        "lack",
        "lacks",
        "lacking",
        "unable",
        "deprecated",
        "instead",
        "unavailable",
        "unsupported",
        "optional",
        "avoid",
        "avoiding",
        "prevent",
        "prevents",
        "except",
        "uncertain",
        "unclear",
        "unknown",
        "different",
    }
)
# A negation followed by one of these is a positive ("don't forget" = "remember").
_DOUBLE_NEGATIVES = frozenset({"forget", "fail", "hesitate"})
_ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "cf", "approx"})
_STOPWORD_TEXT = """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just let me more most my myself of off on once only or other our ours ourselves
    out over own same she should so some such than that the their theirs them themselves then
    there these they this those through to too under until up very was we were what when where
    which while who whom why will with would you your yours yourself yourselves please tell
    explain give describe may might must shall s t"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def is_content_token(piece: str) -> bool:
    """Whether a word piece of the embedder's vocabulary carries content (for token alignment)."""
    return any(c.isalnum() for c in piece) and piece not in _STOPWORDS


def token_alignment(query: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over ``query`` token rows of the best cosine with a ``candidate`` token row."""
    return float(_token_cosines(query, candidate).max(axis=1).mean())


def _token_cosines(query: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Every ``query`` token row's cosine with every ``candidate`` token row."""
    return np.asarray(query, dtype=np.float32) @ np.asarray(candidate, dtype=np.float32).T


def _norm_word(word: str) -> str:
    """Lower-case and fold the most common inflections so paraphrases match their origin."""
    w = word.lower()
    if w.endswith("'s"):
        w = w[:-2]
    w = w.strip("'.-")
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return w


def _is_negation(word: str) -> bool:
    return word in _NEGATIONS or word.endswith("n't")


def _negated(words: list[str]) -> bool:
    """Whether lower-cased ``words`` hold a real negation.

    Not counted: "not only" (... but also), "or not" (whether or not) and double negatives
    such as "don't forget".
    """
    for i, word in enumerate(words):
        if not _is_negation(word):
            continue
        following = words[i + 1] if i + 1 < len(words) else ""
        if word == "not" and (following == "only" or (i > 0 and words[i - 1] == "or")):
            continue
        if following in _DOUBLE_NEGATIVES:
            continue
        return True
    return False


def _is_identifier(token: str) -> bool:
    """Code-like tokens: snake_case, dotted.names, CamelCase inner capitals, letter+digit mixes."""
    if "_" in token or ("." in token.strip(".") and not token.replace(".", "").isdigit()):
        return not all(len(part) <= 1 for part in token.split("."))  # "e.g" is no identifier
    if any(c.isupper() for c in token[1:]) and any(c.islower() for c in token):
        return True
    return any(c.isdigit() for c in token) and any(c.isalpha() for c in token)


def _numbers(text: str, words: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(numbers written with digits or as plural counts, numbers only spelled out)."""
    body = _INLINE_MARKER.sub(" ", _LIST_MARKER.sub(" ", text))
    found = {n.replace(",", "").rstrip(".") for n in _NUMBER.findall(body)}
    spelled = {_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS} - found
    return frozenset(found), frozenset(spelled)


def _starts_sentence(text: str, position: int) -> bool:
    window = text[max(0, position - 12) : position]
    before = "".join(c for c in window if c.isascii() or c.isalnum()).rstrip(_OPENERS)
    if position > 12 and not before:
        return False  # only openers in the window: assume mid-sentence
    return not before or before[-1] in ".!?:;\n"


def _entities(text: str) -> frozenset[str]:
    """Proper nouns (capitalised, not sentence-initial) and code identifiers, normalised.

    Capitalised function words ("I", a title-cased "What Is The ...") name nothing.
    """
    out: set[str] = set()
    for match in _WORD.finditer(text):
        token = match.group()
        proper_noun = token[0].isupper() and not _starts_sentence(text, match.start())
        if (proper_noun or _is_identifier(token)) and not _VERSION.fullmatch(token):
            out.add(_norm_word(token))
    out.discard("")
    return frozenset(out - _ABBREVIATIONS - _STOPWORDS)


_CAMEL_PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def _trigrams(text: str) -> frozenset[str]:
    return frozenset(text[i : i + 3] for i in range(len(text) - 2))


def _split_camel(text: str) -> list[str]:
    """Words with CamelCase split, lower-cased ("JavaScript" -> "java", "script")."""
    return [part.lower() for part in _CAMEL_PART.findall(text)]


@lru_cache(maxsize=8192)
def text_features(text: str) -> TextFeatures:
    """Extract (and memoise) the lexical features of ``text``."""
    stripped = _ANSWER_PARTICLE.sub("", text.replace(_APOSTROPHE, "'"), count=1)
    tokens = _WORD.findall(stripped)
    raw_words = [w.lower() for w in tokens]
    words = frozenset(_norm_word(w) for w in raw_words) - {""}
    # "datasets.Metric" also mentions "Metric"; "IterableDataset" mentions "iterable", "dataset".
    words |= {w.rsplit(".", 1)[1] for w in words if "." in w.strip(".")} - {""}
    quoted = tuple(
        q
        for m in _QUOTED.finditer(stripped)
        # Nested or unbalanced quotes pair up the text *between* two quoted strings, which
        # starts or ends with a space; a real quoted string does not.
        if (q := next(g for g in m.groups() if g)) == q.strip()
    )
    numbers, number_words = _numbers(stripped, raw_words)
    return TextFeatures(
        words=words,
        content=frozenset(w for w in words if w not in _STOPWORDS and not _is_negation(w)),
        numbers=numbers,
        number_words=number_words,
        negated=_negated(raw_words),
        negative_cues=_NEGATIVE_CUES.intersection(raw_words),
        entities=_entities(stripped),
        quoted=tuple(" ".join(q.lower().split()) for q in quoted),
        lowered=" ".join(stripped.lower().split()),
        canonical="".join(ch for ch in text.lower() if ch.isalnum()),
        surface=_trigrams(" ".join(text.split())),
        tokens=tuple(tokens),
        stripped=stripped,
    )


def _initials(words: list[str]) -> set[str]:
    """Acronyms a text spells out: initials of every 2..5-word run ("machine learning" -> "ml")."""
    heads = [w[0] for w in words if w]
    return {"".join(heads[i : i + n]) for n in range(2, 6) for i in range(len(heads) - n + 1)}


@lru_cache(maxsize=1024)
def _spelled(tokens: tuple[str, ...]) -> tuple[tuple[str, frozenset[str]], ...]:
    """Acronyms a text spells out, with the words spelling them.

    Initials of every 2..5-word run, CamelCase split ("machine learning" -> "ml",
    "JavaScript" -> "js"), each with the normalised words of the run.
    """
    parts = [(part, _norm_word(token)) for token in tokens for part in _split_camel(token)]
    runs: dict[str, set[str]] = {}
    for n in range(2, 6):
        for i in range(len(parts) - n + 1):
            run = parts[i : i + n]
            runs.setdefault("".join(p[0] for p, _ in run), set()).update(w for _, w in run)
    return tuple((initials, frozenset(ws)) for initials, ws in runs.items())


@lru_cache(maxsize=1024)
def _compounds(tokens: tuple[str, ...]) -> tuple[tuple[str, frozenset[str]], ...]:
    """Entities made of words the other text may use separately, with those words.

    "IterableDataset" (iterable, dataset), "datasets.Metric" (dataset, metric).
    """
    out = []
    for token in tokens:
        last = token.rsplit(".", 1)[-1]
        parts = [_norm_word(p) for p in _split_camel(last)]
        if len(parts) > 1 and all(len(p) > 1 for p in parts):
            out.append((_norm_word(last), frozenset(parts)))
        dotted = [_norm_word(p) for p in token.split(".")]
        if len(dotted) > 1 and all(len(p) > 1 for p in dotted):
            out.append((_norm_word(token), frozenset(dotted)))
    return tuple(out)


def _same_stem(a: str, b: str) -> bool:
    """One word a short extension of the other ("python" / "pythonic", a typo'd "installatio")."""
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    return len(short) >= 5 and len(long) - len(short) <= 3 and long.startswith(short)


def _missing_entities(a: TextFeatures, b: TextFeatures) -> set[str]:
    """Entities of ``a`` that ``b`` does not mention.

    Tolerated: an acronym that the other text spells out ("ML" / "machine learning", "JS" /
    "JavaScript", either way round) and a short extension of the same stem ("Python" /
    "Pythonic").
    """
    missing = set(a.entities - b.words)
    if missing:
        missing -= b.acronyms
    if missing:
        for initials, run in _spelled(a.tokens):
            if initials in b.entities:  # "JS" (an entity of b) spelled out by a
                missing -= run
    if missing:
        missing = {e for e in missing if not any(_same_stem(e, w) for w in b.words)}
    if missing:
        missing -= {e for e, parts in _compounds(a.tokens) if parts <= b.words}
    return missing


def _numbers_differ(q: TextFeatures, c: TextFeatures) -> bool:
    """Different numbers, unless one text only adds spelled-out counts ("two methods")."""
    qn, cn = q.numbers | q.number_words, c.numbers | c.number_words
    if qn == cn:
        return False
    if qn <= cn:
        return not (cn - qn) <= c.number_words
    if cn <= qn:
        return not (qn - cn) <= q.number_words
    return True


def _polarity_differs(q: TextFeatures, c: TextFeatures) -> bool:
    if q.negated == c.negated:
        return False
    positive, negative = (c, q) if q.negated else (q, c)
    # "optional" / "not mandatory" is a rewording; "optional" / "not optional" is not.
    return not positive.negative_cues - negative.negative_cues


def _same_text(a: TextFeatures, b: TextFeatures) -> bool:
    """Equal up to case, punctuation and spacing (two entries, one answer)."""
    return bool(a.canonical) and a.canonical == b.canonical


def _quotes_found(quoted: tuple[str, ...], other: TextFeatures) -> bool:
    return all(q in other.lowered for q in quoted)


def pair_features(
    q: TextFeatures,
    c: TextFeatures,
    neighbors: Sequence[tuple[str, float]],
    index: int,
    query_tokens: np.ndarray | None,
    candidate_tokens: np.ndarray | None,
) -> np.ndarray:
    """The pair model's features (:data:`~leangate.cache.pair_model.FEATURES`) of the query
    and ``neighbors[index]``. The runner-up is the closest neighbour with other text (a
    rival that differs only in case or punctuation is the same answer)."""
    similarity = neighbors[index][1]
    runner_up = max(
        (
            sim
            for i, (text, sim) in enumerate(neighbors)
            if i != index and text_features(text).canonical != c.canonical
        ),
        default=0.0,
    )
    return np.array(
        [
            similarity,
            similarity - runner_up,
            _jaccard(q.surface, c.surface),
            _jaccard(q.trigrams, c.trigrams),
            len(_missing_entities(q, c)),
            len(_missing_entities(c, q)),
            _numbers_differ(q, c),
            _polarity_differs(q, c),
            _mutual_alignment(query_tokens, candidate_tokens),
            abs(len(q.stripped) - len(c.stripped)) / max(len(c.stripped), 1),
        ],
        dtype=np.float64,
    )


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _mutual_alignment(query: np.ndarray | None, candidate: np.ndarray | None) -> float:
    """The lower of both directions' token alignment; 1.0 when either side's tokens are unknown
    (entries stored without them are judged on the other rules alone)."""
    if query is None or candidate is None or not len(query) or not len(candidate):
        return 1.0
    sims = _token_cosines(query, candidate)  # once for both directions
    return float(min(sims.max(axis=1).mean(), sims.max(axis=0).mean()))


class Verifier:
    """Decides whether (and which) nearest cached entry may be served for a query."""

    def __init__(self, settings: VerifierSettings | None = None) -> None:
        self.settings = settings or VerifierSettings()

    def check(
        self,
        query: str,
        candidate: str,
        similarity: float,
        runner_up: float | None = None,
    ) -> Verdict:
        """Verify one candidate (lexical checks, ``min_similarity`` and a plain cosine margin).

        ``runner_up`` is the similarity of the best neighbour whose text differs from
        ``candidate``. Its text is unknown here, so it is taken to be a compatible rival.
        :meth:`select` is more accurate and should be preferred when texts are at hand.
        """
        reason = self.lexical_reason(query, candidate, similarity)
        if (
            reason is None
            and runner_up is not None
            and (similarity - runner_up < self.settings.min_margin)
        ):
            reason = AMBIGUOUS
        return Verdict(accepted=reason is None, similarity=similarity, reason=reason or ACCEPTED)

    def select(
        self,
        query: str,
        neighbors: Sequence[tuple[str, float]],
        *,
        query_tokens: np.ndarray | None = None,
        neighbor_tokens: Sequence[np.ndarray | None] | None = None,
    ) -> Selection:
        """Pick the neighbour to serve from ``(text, similarity)`` pairs, best first, or none.

        Neighbours should have distinct texts (entries with equal text are one answer).
        ``query_tokens`` / ``neighbor_tokens`` are content-token embeddings
        (:meth:`~leangate.cache.embedder.Embedder.encode`); where either is missing, the
        cosine stands in for the token alignment.
        """
        if not neighbors:
            return Selection(None, Verdict(False, 0.0, NO_CANDIDATE))
        s = self.settings
        q = text_features(query)
        features = [text_features(text) for text, _ in neighbors]
        reasons = [self._facts_reason(q, c) for c in features]
        compatible = [i for i, reason in enumerate(reasons) if reason is None]
        if not compatible:
            top_sim = neighbors[0][1]
            reason = LOW_SIMILARITY if top_sim < s.min_similarity else reasons[0]
            return Selection(None, Verdict(False, top_sim, reason or LOW_SIMILARITY))
        scores = {
            i: self._score(q, features[i], neighbors[i][1], query_tokens, neighbor_tokens, i)
            for i in compatible
        }
        best = max(compatible, key=scores.__getitem__)
        sim = neighbors[best][1]
        if sim < s.min_similarity:
            return Selection(None, Verdict(False, sim, LOW_SIMILARITY))
        rejected = [i for i, reason in enumerate(reasons) if reason is not None]
        if rejected:
            leader = max(rejected, key=lambda i: neighbors[i][1])
            if neighbors[leader][1] > sim + s.max_rejected_lead:
                return Selection(None, Verdict(False, sim, reasons[leader] or AMBIGUOUS))
        for i in compatible:
            close = i != best and scores[best] - scores[i] < s.min_margin
            if close and not _same_text(features[i], features[best]):
                return Selection(None, Verdict(False, sim, AMBIGUOUS))
        tokens = neighbor_tokens[best] if neighbor_tokens is not None else None
        if s.min_alignment and _mutual_alignment(query_tokens, tokens) < s.min_alignment:
            return Selection(None, Verdict(False, sim, UNALIGNED))
        if s.min_probability:
            pair = pair_features(q, features[best], neighbors, best, query_tokens, tokens)
            if shipped().probability(pair) < s.min_probability:
                return Selection(None, Verdict(False, sim, IMPROBABLE))
        return Selection(best, Verdict(True, sim, ACCEPTED))

    def lexical_reason(self, query: str, candidate: str, similarity: float) -> str | None:
        """Why ``candidate`` cannot answer ``query`` regardless of rivals, or None."""
        if similarity < self.settings.min_similarity:
            return LOW_SIMILARITY
        return self._facts_reason(text_features(query), text_features(candidate))

    def _score(
        self,
        q: TextFeatures,
        c: TextFeatures,
        similarity: float,
        query_tokens: np.ndarray | None,
        neighbor_tokens: Sequence[np.ndarray | None] | None,
        index: int,
    ) -> float:
        s = self.settings
        score = similarity + s.surface_weight * _jaccard(q.surface, c.surface)
        if s.trigram_weight:
            score += s.trigram_weight * _jaccard(q.trigrams, c.trigrams)
        if s.token_weight:
            tokens = neighbor_tokens[index] if neighbor_tokens is not None else None
            aligned = (
                token_alignment(query_tokens, tokens)
                if query_tokens is not None and tokens is not None and len(tokens)
                else similarity
            )
            score += s.token_weight * aligned
        return score

    def _facts_reason(self, q: TextFeatures, c: TextFeatures) -> str | None:
        s = self.settings
        if s.check_numbers and _numbers_differ(q, c):
            return NUMBERS
        if s.check_negation and _polarity_differs(q, c):
            return NEGATION
        if s.check_entities and (_missing_entities(q, c) or _missing_entities(c, q)):
            return ENTITIES
        if s.check_quoted and not (_quotes_found(q.quoted, c) and _quotes_found(c.quoted, q)):
            return QUOTED
        return None
