"""A request body at the edge: read within its size limit, parsed as one JSON object."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.types import Receive

from leangate.middleware.errors import InvalidRequest, PayloadTooLarge

MAX_JSON_DEPTH = 64
"""Far deeper than any request needs. orjson writes at most 255 levels (cache keys, a
body a stage changed), so a deeper body that was accepted would fail later, as a 500."""


async def read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    """The whole request body, refused with a 413 as soon as it is over ``limit`` bytes."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("the client disconnected before sending its request")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or the 400 that says why it is not one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"could not parse the JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH and _nested_over(data, MAX_JSON_DEPTH):
        raise InvalidRequest(
            f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        )
    return data


def _nested_over(data: object, limit: int) -> bool:
    """Whether ``data`` has more than ``limit`` levels of objects and arrays."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Iterable[object] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
