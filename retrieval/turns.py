"""Which earlier turns of a chat get a summary, and the memory that fixes each turn's form.

Every request of a conversation resends the turns before it. For vLLM's prefix cache to
hit, each of them must read exactly as it did in the request before, so a turn's *form*
(what the ``compress`` stage sends in its place) is decided once and remembered in the
intermediate-result cache, per tenant, model, role and text:

* the current turn (the last user message), when the stage compresses it, is remembered
  as it was sent: the next request of the conversation sends it that way again;
* an earlier user message or answer of at least ``min_turn_tokens`` that has no form yet
  gets its summary (``retrieval/summarize.py``) once it is older than the last
  ``keep_recent_turns`` turns; until then it is sent as it is;
* system messages, short messages and the messages the caller listed in
  ``keep_messages`` are never touched.

So the compressed conversation only grows at its end, as the conversation does; its
prefix is the one the previous request left in vLLM's cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .prompt import question_of

FORM_KIND = "compress-turn"
FORM_VERSION = 1
"""Part of every form's key: a change of what a form means starts new ones."""
SUMMARIZED_ROLES = frozenset({"user", "assistant"})


@dataclass(frozen=True, slots=True)
class Earlier:
    """An earlier message that may be sent in a shorter form."""

    index: int
    role: str
    text: str
    tokens: int
    recent: bool
    """Within the last ``keep_recent_turns`` turns: sent as it is unless it has a form."""
    question: str | None
    """For an answer, the question it answered (guides its summary); None for a user's
    message, whose own question guides."""


def earlier_turns(
    messages: Sequence[Mapping[str, Any]],
    count: Callable[[str], int],
    *,
    min_turn_tokens: int,
    keep_recent_turns: int,
    exclude: Collection[int] = (),
) -> list[Earlier]:
    """The earlier messages that may take a form (see the module docstring)."""
    recent_from = recent_start(messages, keep_recent_turns)
    found: list[Earlier] = []
    question = ""
    for index, message in enumerate(messages[:-1]):
        role = str(message.get("role") or "")
        text = message.get("content")
        if not isinstance(text, str) or role not in SUMMARIZED_ROLES:
            continue
        if role == "user":
            question = text
        if index in exclude:
            continue
        tokens = count(text)
        if tokens < min_turn_tokens:
            continue
        asked = None if role == "user" else question_of(question)
        found.append(Earlier(index, role, text, tokens, index >= recent_from, asked))
    return found


def recent_start(messages: Sequence[Mapping[str, Any]], keep_recent_turns: int) -> int:
    """The index from which earlier messages are recent: the ``keep_recent_turns``-th
    user message before the last message (a turn is a user message and what follows it)."""
    last = len(messages) - 1
    if keep_recent_turns <= 0:
        return last
    users = [i for i, m in enumerate(messages[:last]) if m.get("role") == "user"]
    if len(users) < keep_recent_turns:
        return 0
    return users[-keep_recent_turns]


def form_key(model: str, role: str, text: str) -> list[Any]:
    """What identifies a turn across requests: its model, role and exact text."""
    return [FORM_VERSION, model, role, hashlib.sha256(text.encode()).hexdigest()]


def with_forms(
    messages: Sequence[Mapping[str, Any]], forms: Mapping[int, str]
) -> list[dict[str, Any]]:
    """``messages`` (copies) with the content of each message in ``forms`` replaced."""
    out = [dict(m) for m in messages]
    for index, text in forms.items():
        out[index]["content"] = text
    return out
