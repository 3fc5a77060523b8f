"""Converting answers between their streamed and their whole form.

The cache keeps one form, the whole (non-streamed) response, so that a streamed answer can
serve a later plain request and the other way round. ``assemble`` folds a stream's chunk
payloads into that form; ``to_events`` unfolds it into chunk payloads for a streamed hit.
Answers that cannot make the round trip faithfully (tool calls, logprobs, errors, a choice
without a finish reason) are not assembled, so they are never stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from leangate.middleware.protocol import Route

REPLAY_PIECE_CHARS = 64
"""A replayed answer arrives in pieces of this many characters, like a real stream."""


def is_complete(completion: dict[str, Any]) -> bool:
    """Whether a whole response is a finished, storable answer."""
    choices = completion.get("choices")
    if "error" in completion or not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not choice.get("finish_reason") or choice.get("logprobs"):
            return False
        message = choice.get("message") or {}
        if message.get("tool_calls"):
            return False
    return True


def assemble(route: Route, events: Iterable[bytes]) -> dict[str, Any] | None:
    """Fold streamed chunk payloads into a whole response; None if it cannot be stored."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    roles: dict[int, str] = {}
    head: dict[str, Any] = {}
    usage: Any = None
    for payload in events:
        chunk = orjson.loads(payload)
        if "error" in chunk:
            return None
        if not head:
            head = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index", 0))
            if choice.get("logprobs"):
                return None
            if route == "chat":
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    return None
                roles.setdefault(index, delta.get("role") or "assistant")
                piece = delta.get("content")
            else:
                piece = choice.get("text")
            texts.setdefault(index, []).append(piece or "")
            if choice.get("finish_reason"):
                finish[index] = choice["finish_reason"]
    if not texts or any(not finish.get(i) for i in texts):
        return None
    choices = [_choice(route, i, "".join(texts[i]), finish[i], roles.get(i)) for i in sorted(texts)]
    whole = {
        "id": head.get("id"),
        "object": "chat.completion" if route == "chat" else "text_completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": choices,
    }
    if usage is not None:
        whole["usage"] = usage
    return whole


def _choice(route: Route, index: int, text: str, finish: str | None, role: str | None) -> Any:
    if route == "chat":
        message = {"role": role or "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def to_events(route: Route, completion: dict[str, Any], *, include_usage: bool) -> list[bytes]:
    """Unfold a whole response into the chunk payloads of an equivalent stream."""
    base = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk" if route == "chat" else "text_completion",
        "created": completion.get("created"),
        "model": completion.get("model"),
    }
    events: list[bytes] = []
    for choice in completion.get("choices", []):
        index = choice.get("index", 0)
        if route == "chat":
            message = choice.get("message") or {}
            role = message.get("role", "assistant")
            events.append(_chunk(base, [{"index": index, "delta": {"role": role, "content": ""}}]))
            text = message.get("content") or ""
        else:
            text = choice.get("text") or ""
        pieces = [text[i : i + REPLAY_PIECE_CHARS] for i in range(0, len(text), REPLAY_PIECE_CHARS)]
        for n, piece in enumerate(pieces or [""]):
            last = n == max(len(pieces) - 1, 0)
            finish = choice.get("finish_reason") if last else None
            events.append(_chunk(base, [_delta(route, index, piece, finish)]))
    if include_usage and completion.get("usage") is not None:
        events.append(_chunk(base, [], usage=completion["usage"]))
    return events


def _delta(route: Route, index: int, piece: str, finish: str | None) -> dict[str, Any]:
    if route == "chat":
        return {
            "index": index,
            "delta": {"content": piece},
            "logprobs": None,
            "finish_reason": finish,
        }
    return {"index": index, "text": piece, "logprobs": None, "finish_reason": finish}


def _chunk(base: dict[str, Any], choices: list[Any], **extra: Any) -> bytes:
    return orjson.dumps({**base, "choices": choices, **extra})
