"""The gateway: from a request's bytes to a ``Result``, independent of the HTTP framework.

The ASGI app (``app.py``) and the in-process SDK both drive this class.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from leangate.backend.client import REQUEST_ID_HEADER, BackendClient
from leangate.backend.errors import ModelNotFound
from leangate.cache.store import StoreError
from leangate.middleware.body import parse_object
from leangate.middleware.chains import ChainBook
from leangate.middleware.context import RequestContext, Result, client_request_id
from leangate.middleware.endpoint import forward
from leangate.middleware.errors import InvalidRequest, Unauthorized, describe_validation_error
from leangate.middleware.keys import KeyStoreUnavailable
from leangate.middleware.limits import Limiter
from leangate.middleware.policy import ANONYMOUS, Policy
from leangate.middleware.protocol import RequestOptions, Route
from leangate.middleware.registry import known_stages
from leangate.middleware.services import Services
from leangate.middleware.tracing import Attributes

NO_OPTIONS = RequestOptions()
STAGES_HEADER = "x-leangate-stages"
DISABLE_HEADER = "x-leangate-disable"


class Gateway:
    """Validates a request, resolves its tenant and chain, and runs the chain."""

    def __init__(self, services: Services, policy: Policy) -> None:
        self.services = services
        self.book = ChainBook(policy, services, forward)
        self.limiter = services.limiter or Limiter(services.metrics)

    @property
    def backend(self) -> BackendClient:
        return self.services.backend

    def use_policy(self, policy: Policy) -> None:
        self.book = ChainBook(policy, self.services, forward)

    async def run(
        self, route: Route, body: bytes, headers: Mapping[str, str]
    ) -> tuple[Result, RequestContext]:
        """Prepare and execute in one go; the caller must ``await ctx.scope.aclose()`` once
        the result was sent or dropped."""
        ctx = self.prepare(route, body, headers, await self.tenant_for(headers))
        return await self.execute(ctx), ctx

    async def execute(self, ctx: RequestContext) -> Result:
        """Admit the request under its tenant's limits and run its chain; on failure its
        scope is closed here."""
        tracing = self.services.tracing
        if tracing is None:
            return await self._execute(ctx)
        attributes: Attributes = {
            "leangate.route": ctx.route,
            "leangate.model": ctx.model,
            "leangate.tenant": self.tenant_label(ctx.tenant),
            "leangate.stream": ctx.stream,
        }
        with tracing.span("leangate.request", attributes):
            return await self._execute(ctx)

    async def _execute(self, ctx: RequestContext) -> Result:
        chain = self.book.chain_for(ctx.route, ctx.model, ctx.tenant, ctx.options)
        try:
            limits = self.book.policy.limits_for(ctx.tenant)
            if limits is not None:
                await self.limiter.admit(ctx, limits)
            return await chain(ctx)
        except BaseException:
            await ctx.scope.aclose()
            raise

    async def tenant_for(self, headers: Mapping[str, str]) -> str:
        """The tenant of the request's API key: listed in the policy, else kept in Redis,
        else a tenant of its own (or refused, with ``require_api_key``)."""
        api_key = _bearer(headers)
        policy = self.book.policy
        tenant = policy.listed_tenant(api_key)
        if tenant is None and api_key and self.services.keys is not None:
            tenant = await self._stored_tenant(api_key)
        tenant = tenant or policy.unlisted_tenant(api_key)
        if tenant is None:
            raise Unauthorized("a valid API key is required")
        return tenant

    async def _stored_tenant(self, api_key: str) -> str | None:
        keys = self.services.keys
        assert keys is not None
        try:
            return await keys.tenant_of(api_key)
        except StoreError:
            if self.book.policy.require_api_key:
                raise KeyStoreUnavailable("API keys cannot be checked now; retry") from None
            return None  # the key's own tenant: it sees no other tenant's data

    def body_limit(self, tenant: str, default: int) -> int:
        """The most bytes a request body of ``tenant`` may have."""
        limits = self.book.policy.limits_for(tenant)
        if limits is None or limits.max_body_bytes is None:
            return default
        return min(default, limits.max_body_bytes)

    def tenant_label(self, tenant: str) -> str:
        """``tenant`` as a metrics label: a tenant of the policy, ``anonymous``, or
        ``other`` (a key no tenant lists is a tenant of its own: unbounded)."""
        policy = self.book.policy
        return tenant if tenant in policy.tenants or tenant == ANONYMOUS else "other"

    def prepare(
        self, route: Route, body: bytes, headers: Mapping[str, str], tenant: str
    ) -> RequestContext:
        """Validate the request of ``tenant`` (from ``tenant_for``) into its context."""
        data = parse_object(body)
        raw: bytes | None = body
        options_field = data.pop("leangate", None)
        if options_field is not None:
            raw = None
        options = _options(options_field, headers)
        try:
            ctx = RequestContext.validated(
                route,
                data,
                tenant=tenant,
                backend=self.backend,
                raw=raw,
                headers=headers,
                options=options,
            )
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc)) from None
        if self.backend.ready and not self.backend.serves(ctx.model):
            raise ModelNotFound(ctx.model)
        request_id = client_request_id(headers)
        if request_id is not None:
            ctx.response_headers[REQUEST_ID_HEADER] = request_id
        return ctx


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else value.strip()


def _options(field: object, headers: Mapping[str, str]) -> RequestOptions:
    """Merge the ``leangate`` body field and the ``x-leangate-*`` headers."""
    only = headers.get(STAGES_HEADER)
    disable = headers.get(DISABLE_HEADER)
    if field is None and only is None and not disable:
        return NO_OPTIONS
    try:
        options = RequestOptions.model_validate({} if field is None else field)
    except ValidationError as exc:
        raise InvalidRequest("leangate." + describe_validation_error(exc)) from None
    stages = options.stages
    if only is not None:
        names = [] if only.strip() == "none" else _split(only)
        stages = names if stages is None else [n for n in stages if n in names]
    turned_off = [*options.disable, *_split(disable or "")]
    unknown = [n for n in (stages or []) + turned_off if n not in known_stages()]
    if unknown:
        raise InvalidRequest(f"leangate: unknown stage(s) {unknown}", code="unknown_stage")
    return options.model_copy(update={"stages": stages, "disable": turned_off})


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
