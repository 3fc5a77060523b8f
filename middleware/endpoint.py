"""The end of every chain, and of sub-requests that skip the rest of it: the backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from leangate.backend.sse import iter_events
from leangate.backend.transport import UpstreamResponse
from leangate.middleware.context import (
    JsonResult,
    RequestContext,
    Result,
    StreamResult,
    client_request_id,
)


async def forward(ctx: RequestContext) -> Result:
    """Send the request, as it now stands, to a replica serving its model."""
    backend = ctx.backend
    response = await backend.send(
        ctx.path,
        ctx.body_bytes(),
        model=ctx.model,
        stream=ctx.stream,
        affinity_key=partial(ctx.affinity_key, backend.settings.affinity_prefix_chars),
        request_id=client_request_id(ctx.headers),
    )
    if not ctx.stream:
        return JsonResult(await response.read())
    ctx.scope.defer(response.aclose)  # released even if nobody ever reads the stream
    return StreamResult(_relay(response), upstream=response)


async def _relay(response: UpstreamResponse) -> AsyncIterator[bytes]:
    try:
        async for payload in iter_events(response.iter_chunks()):
            yield payload
    finally:
        await response.aclose()
