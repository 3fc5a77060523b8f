"""What makes two requests the same, for the exact and the semantic cache.

Every key is scoped by tenant and by the policy's cache namespace, hashed so that any
tenant name is safe inside a Redis key and a purge can match on the prefix::

    lg:{tenant}:{namespace}:ans:{request hash}     a whole answer (exact and semantic hits)
    lg:{tenant}:{namespace}:sem:{request hash}     a semantic entry pointing at an answer
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from leangate.middleware.context import RequestContext

PREFIX = "lg"
SEMANTIC_EVENTS = f"{PREFIX}:events:semantic"
SEMANTIC_INDEX = f"{PREFIX}:index:semantic"

NOT_IN_KEY = frozenset({"stream", "stream_options", "user"})
"""Request fields that do not change the answer; everything else is part of the key."""


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scope_prefix(tenant: str | None = None, namespace: str | None = None) -> str:
    """The key prefix of one tenant and/or namespace, ``*`` standing for any."""
    t = short_hash(tenant) if tenant is not None else "*"
    n = short_hash(namespace) if namespace is not None else "*"
    return f"{PREFIX}:{t}:{n}:"


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def exact_hash(ctx: RequestContext) -> str:
    """Hash of the normalized request: route, model, every message, every sampling field."""
    fields = {k: v for k, v in ctx.body.items() if k not in NOT_IN_KEY}
    extra = ctx.options.answer_inputs()
    if extra is None:
        return _digest({"route": ctx.route, "body": fields})
    return _digest({"route": ctx.route, "body": fields, "options": extra})


def answer_key(ctx: RequestContext, namespace: str, request_hash: str) -> str:
    return f"{scope_prefix(ctx.tenant, namespace)}ans:{request_hash}"


def semantic_key(ctx: RequestContext, namespace: str, request_hash: str) -> str:
    return f"{scope_prefix(ctx.tenant, namespace)}sem:{request_hash}"


def semantic_parts(ctx: RequestContext, namespace: str) -> tuple[str, str] | None:
    """``(scope, query text)`` for the semantic cache, or None if the request has no text
    to compare.

    The scope hashes everything except the last user turn: tenant, namespace, model,
    sampling fields, the system prompt and every earlier turn. A follow-up turn can only
    match an entry made in the same conversation.
    """
    body = ctx.body
    if ctx.route == "chat":
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        if last.get("role") != "user" or not isinstance(last.get("content"), str):
            return None
        text, context = last["content"], messages[:-1]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        text, context = prompt, []
    fields = {k: v for k, v in body.items() if k not in NOT_IN_KEY | {"messages", "prompt"}}
    scope = _digest(
        {
            "tenant": ctx.tenant,
            "ns": namespace,
            "route": ctx.route,
            "fields": fields,
            "ctx": context,
            "options": ctx.options.answer_inputs(),
        }
    )
    return scope, text
