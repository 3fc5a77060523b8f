"""Reading and writing OpenAI answers, whole and streamed, for stages that compose them.

Stages that assemble an answer from several backend calls (planners) read each call's text
with ``answer_text`` / ``delta_text`` and write the client's answer with ``ChunkWriter``
(streamed) or ``whole_answer`` (plain), so the client sees one consistent completion.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from leangate.middleware.protocol import Route


def _first_text(route: Route, payload: dict[str, Any], chat_field: str) -> str:
    choices = payload.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if route == "chat":
        return str((choice.get(chat_field) or {}).get("content") or "")
    return str(choice.get("text") or "")


def answer_text(route: Route, answer: dict[str, Any]) -> str:
    """The first choice's text of a whole answer ("" if there is none)."""
    return _first_text(route, answer, "message")


def finish_reason(answer_or_chunk: dict[str, Any]) -> str | None:
    choices = answer_or_chunk.get("choices") or []
    return choices[0].get("finish_reason") if choices else None


def delta_text(route: Route, chunk: dict[str, Any]) -> str:
    """The first choice's new text in one streamed chunk."""
    return _first_text(route, chunk, "delta")


def _completion_id(route: Route) -> str:
    prefix = "chatcmpl" if route == "chat" else "cmpl"
    return f"{prefix}-lg-{uuid.uuid4().hex}"


class ChunkWriter:
    """Chunk payloads of one streamed answer, with one id, model and creation time."""

    def __init__(self, route: Route, model: str) -> None:
        self.route = route
        self._base = {
            "id": _completion_id(route),
            "object": "chat.completion.chunk" if route == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self._role_sent = False

    def text(self, piece: str, finish: str | None = None) -> bytes:
        if self.route == "chat":
            delta: dict[str, Any] = {"content": piece}
            if not self._role_sent:
                delta = {"role": "assistant", **delta}
                self._role_sent = True
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": piece}
        choice.update(logprobs=None, finish_reason=finish)
        return orjson.dumps({**self._base, "choices": [choice]})

    def finish(self, reason: str) -> bytes:
        return self.text("", reason)

    def usage(self, usage: dict[str, int]) -> bytes:
        return orjson.dumps({**self._base, "choices": [], "usage": usage})


def whole_answer(
    route: Route, model: str, text: str, finish: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A plain (non-streamed) answer."""
    if route == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {
        "id": _completion_id(route),
        "object": "chat.completion" if route == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
