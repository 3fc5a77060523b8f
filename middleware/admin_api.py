"""The admin API: routes that act for every tenant, behind the admin key.

``/admin/keys`` makes, lists and revokes the API keys kept in Redis (``middleware/keys.py``);
the cache purge route lives with the app. Without an admin key set, the admin API is off.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from leangate.middleware.errors import describe_validation_error, error_payload
from leangate.middleware.gateway import Gateway
from leangate.middleware.keys import KeyStore
from leangate.settings import Settings

log = logging.getLogger(__name__)

DIGEST = re.compile(r"[0-9a-f]{64}")


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")


def add_admin_routes(app: FastAPI) -> None:
    app.add_route("/admin/keys", _with_keys(_create_key), methods=["POST"])
    app.add_route("/admin/keys", _with_keys(_list_keys), methods=["GET"])
    app.add_route("/admin/keys/{sha256}", _with_keys(_revoke_key), methods=["DELETE"])


def is_admin(request: Request, settings: Settings) -> bool:
    """Whether the request carries the admin key (compared in constant time, as bytes, so
    that any header value compares instead of raising)."""
    if settings.admin_api_key is None:
        return False
    supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    expected = settings.admin_api_key.get_secret_value()
    return hmac.compare_digest(supplied.encode(), expected.encode())


def admin_refusal(request: Request) -> Response | None:
    """The error for a request without the admin key, or None when it has it."""
    settings: Settings = request.app.state.settings
    if not settings.admin_api_key:
        return error(403, "the admin API is disabled (no admin key set)", "permission_error")
    if not is_admin(request, settings):
        return error(401, "a valid admin key is required", "authentication_error")
    return None


def error(status: int, message: str, error_type: str, code: str | None = None) -> Response:
    body = error_payload(message, error_type, code or error_type)
    return Response(body, status, media_type="application/json")


KeyRoute = Callable[[Request, KeyStore], Awaitable[Response]]


def _with_keys(route: KeyRoute) -> Callable[[Request], Awaitable[Response]]:
    """``route`` behind the admin key, given the key store; Redis failing is a 503."""

    async def handle(request: Request) -> Response:
        refused = admin_refusal(request)
        if refused is not None:
            return refused
        gateway: Gateway = request.app.state.gateway
        keys = gateway.services.keys
        if keys is None:
            message = "keys are kept in Redis: set LEANGATE_REDIS_URL"
            return error(409, message, "invalid_request_error")
        try:
            return await route(request, keys)
        except (RedisError, OSError) as exc:
            log.warning("the key store failed: %r", exc)
            return error(503, "the key store cannot answer; retry", "service_unavailable")

    return handle


async def _create_key(request: Request, keys: KeyStore) -> Response:
    """A new key for a tenant; the answer is the only place the key is ever shown."""
    try:
        body = NewKey.model_validate_json(await request.body())
    except ValidationError as exc:
        return error(400, describe_validation_error(exc), "invalid_request_error")
    api_key, digest = await keys.create(body.tenant)
    return JSONResponse({"api_key": api_key, "sha256": digest, "tenant": body.tenant}, 201)


async def _list_keys(request: Request, keys: KeyStore) -> Response:
    tenant = request.query_params.get("tenant")
    return JSONResponse({"object": "list", "data": await keys.listing(tenant)})


async def _revoke_key(request: Request, keys: KeyStore) -> Response:
    digest = request.path_params["sha256"].lower()
    if not DIGEST.fullmatch(digest):
        return error(400, "a key is named by its hex SHA-256 digest", "invalid_request_error")
    if not await keys.revoke(digest):
        return error(404, "no key has this digest", "not_found", "key_not_found")
    return JSONResponse({"sha256": digest, "revoked": True})
