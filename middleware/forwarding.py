"""The backend's other JSON endpoints (embeddings, tokenize, score, ...), forwarded as they are.

An app that points its OpenAI client at leangate calls more than completions: the same
client's ``embeddings.create``, or vLLM's ``/tokenize``, must not get a 404. No stage runs
on these calls, but the edge still does its part: the API key and its tenant, the body's
size, a JSON object naming a model some replica serves, and the tenant's request-rate,
token-rate (the body's characters / 4, as for prompts) and concurrency limits. The
backend's answer goes back byte for byte, error statuses included.

Which paths are forwarded is a setting (``Settings.forward_paths``); streaming and
multipart endpoints (``/v1/responses``, audio) are not among the defaults.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import Receive, Scope

from leangate.backend.client import REQUEST_ID_HEADER
from leangate.backend.errors import BackendError
from leangate.backend.tokenizer import DEFAULT_CHARS_PER_TOKEN
from leangate.middleware.body import parse_object, read_body
from leangate.middleware.context import client_request_id
from leangate.middleware.errors import InvalidRequest, ProxyError, error_response
from leangate.middleware.gateway import Gateway
from leangate.middleware.scope import RequestScope

log = logging.getLogger(__name__)


async def forward_call(
    gateway: Gateway, max_body_bytes: int, scope: Scope, receive: Receive
) -> Response:
    """Answer one POST to a forwarded path; every error is an OpenAI-style one."""
    started = time.perf_counter()
    path: str = scope["path"]
    headers = Headers(scope=scope)
    served = tenant = ""  # the model label: only a model a replica answered for
    request = RequestScope()
    try:
        tenant = await gateway.tenant_for(headers)
        body = await read_body(receive, headers, gateway.body_limit(tenant, max_body_bytes))
        model = _model(gateway, body)
        limits = gateway.book.policy.limits_for(tenant)
        if limits is not None:
            cost = math.ceil(len(body) / DEFAULT_CHARS_PER_TOKEN)
            await gateway.limiter.admit_call(tenant, limits, request, cost)
        request_id = client_request_id(headers)
        upstream = await gateway.backend.send(
            path, body, model=model, stream=False, request_id=request_id
        )
        served = model
        content = await upstream.read()
        response = Response(content, upstream.status, media_type=_content_type(upstream.headers))
        if request_id is not None:
            response.headers[REQUEST_ID_HEADER] = request_id
    except Exception as exc:
        if not isinstance(exc, BackendError | ProxyError):
            log.exception("unexpected error on %s", path)
        response = error_response(exc)
    finally:
        await request.aclose()
    label = gateway.tenant_label(tenant) if tenant else ""
    seconds = time.perf_counter() - started
    gateway.services.metrics.request_done(path, response.status_code, seconds, served, label)
    return response


def _model(gateway: Gateway, body: bytes) -> str:
    """The body's ``model``, or the one model the replicas serve when it names none."""
    data = parse_object(body)
    model = data.get("model")
    if isinstance(model, str) and model:
        return model
    if model is not None:
        raise InvalidRequest("model must be a string")
    served = {str(card["id"]) for card in gateway.backend.model_cards()}
    if len(served) == 1:
        return served.pop()
    raise InvalidRequest("this request must name its model (the replicas serve several)")


def _content_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "application/json")
