"""Whether a question asks several things at once: the ``decompose`` stage's router.

Conservative on purpose: it counts only questions that say so in their form, two
questions in one message ("Who designed the bridge? When was it built?") or two
interrogative clauses joined ("Who designed the bridge, and when was it built?"). A
multi-hop question written as one clause ("When was the designer of the bridge born?")
is not counted: telling it from a plain question needs more than its form, and a wrong
"yes" costs a plan, its steps and a synthesis where one answer would do.
"""

from __future__ import annotations

import re

ASKING = (
    r"(?:who|whom|whose|what|what's|when|where|which|why|how|is|are|was|were|does|do|did|"
    r"can|could|should|would|will|has|have)"
)
LEAD = r"(?:(?:so|and|also|but|then|now|please|ok|okay)\W+)?"
OPENING = re.compile(rf"^\s*{LEAD}{ASKING}\b", re.I)
"""A question in form: it opens with an interrogative word (not "As a pirate, what ...")."""
JOINED = re.compile(
    r"[,;]\s+(?:and|but|also|then)\s+(?:also\s+)?(?:(?:in|at|on|for|from|with|by|to|of)\s+)?"
    r"(?:who|whom|whose|what|when|where|which|why|how)\b"
    r"|\s(?:and|also|then)\s+(?:also\s+)?(?:what|when|where|why|how)\b",
    re.I,
)
"""A second interrogative clause joined to the first ("..., and why ..."). Without a comma,
only words that rarely open a relative clause count ("the university whose campus is in
Lawrence and whose branches ..." asks one thing)."""
QUESTION_MARK = re.compile(r"\?+")


def question_parts(question: str) -> int:
    """How many questions ``question`` asks, by its form (see the module docstring)."""
    asked = [q for q in QUESTION_MARK.split(question) if q.strip()]
    ended = len(QUESTION_MARK.findall(question))
    if ended >= 2:
        return max(sum(1 for q in asked[:ended] if OPENING.match(q)), 1)
    if not OPENING.match(question):
        return 1
    return 1 + len(JOINED.findall(question))


def asks_several(question: str) -> bool:
    return question_parts(question) >= 2
