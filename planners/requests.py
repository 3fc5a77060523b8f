"""What the planners read from a request: the question they may plan, and the sampling
fields their sub-requests keep."""

from __future__ import annotations

from typing import Any

from leangate.middleware.context import RequestContext
from leangate.middleware.protocol import ChatCompletionRequest

SAMPLING_FIELDS = ("model", "temperature", "top_p", "seed", "frequency_penalty")


def plannable_question(ctx: RequestContext) -> str | None:
    """The last user message of a plain chat request a planner can answer in its own way;
    None for anything else (several choices, tools, a response format, logprobs)."""
    request = ctx.request
    body = ctx.body
    if not isinstance(request, ChatCompletionRequest) or (body.get("n") or 1) > 1:
        return None
    if body.get("tools") or body.get("response_format") or body.get("logprobs"):
        return None
    last = request.messages[-1]
    if last.role != "user" or not isinstance(last.content, str) or not last.content.strip():
        return None
    return last.content


def sampling(ctx: RequestContext) -> dict[str, Any]:
    return {k: ctx.body[k] for k in SAMPLING_FIELDS if k in ctx.body}
