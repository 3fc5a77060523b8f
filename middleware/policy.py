"""Policies: which stages run, with which settings, for which route, model and tenant.

A policy is one YAML file validated by these models; an unknown key anywhere is an error
that names the field. Rules are tried in order and the first whose ``match`` fits the
request decides its stages. A request no rule matches runs no stage.

.. code-block:: yaml

    limits: {requests_per_minute: 600, max_tokens: 2048}   # every tenant's
    tenants:
      acme:
        api_keys: [sk-acme-1]
        limits: {requests_per_minute: 60, concurrent_requests: 4}
    rules:
      - name: cached-chat
        match: {routes: [chat], models: ["SmolLM2-*"], tenants: [acme]}
        stages:
          - use: cache
            budget_ms: 50
            settings: {ttl_s: 600}
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)

from leangate.middleware.errors import describe_validation_error, validation_problems
from leangate.middleware.keys import key_digest
from leangate.middleware.limits import Limits
from leangate.middleware.protocol import Route
from leangate.middleware.registry import stage_class

ANONYMOUS = "anonymous"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageSpec(_Strict):
    use: str
    """The stage's registered name."""
    budget_ms: float | None = Field(None, gt=0)
    """The stage's own time budget; defaults to the stage's default, then the policy's."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """The stage's own settings, validated by its settings model; those left out take their
    defaults."""
    _validated: BaseModel = PrivateAttr()

    @model_validator(mode="after")
    def _check_stage(self) -> StageSpec:
        cls = stage_class(self.use)
        try:
            self._validated = cls.Settings.model_validate(self.settings)
        except ValidationError as exc:
            problems = describe_validation_error(exc)
            raise ValueError(
                f"invalid settings for stage {self.use!r}: settings.{problems}"
            ) from None
        return self

    @property
    def validated_settings(self) -> BaseModel:
        return self._validated


class Match(_Strict):
    routes: list[Route | Literal["*"]] = Field(default_factory=lambda: ["*"])  # type: ignore[arg-type]
    """``chat`` (``/v1/chat/completions``), ``completions`` (``/v1/completions``) or ``"*"``."""
    models: list[str] = Field(default_factory=lambda: ["*"])
    """Glob patterns (``fnmatch``)."""
    tenants: list[str] = Field(default_factory=lambda: ["*"])
    """Tenant names: the policy's, ``anonymous`` (no key) or ``key-`` and 16 hex digits of its
    SHA-256 (a key no tenant lists)."""

    def fits(self, route: Route, model: str, tenant: str) -> bool:
        return (
            ("*" in self.routes or route in self.routes)
            and any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)
            and ("*" in self.tenants or tenant in self.tenants)
        )


class Rule(_Strict):
    name: str
    """The rule's name, for people reading the policy and in its validation errors."""
    match: Match = Field(default_factory=Match)
    """Which requests the rule applies to; all of them by default."""
    stages: list[StageSpec] = Field(default_factory=list)
    """The chain, run in this order, each stage at most once (none: straight to the backend)."""

    @model_validator(mode="after")
    def _unique_stages(self) -> Rule:
        names = [s.use for s in self.stages]
        if len(names) != len(set(names)):
            raise ValueError(f"rule {self.name!r} lists a stage twice: {names}")
        return self


class Tenant(_Strict):
    api_keys: list[SecretStr] = Field(default_factory=list)
    """Keys that resolve to this tenant (compared as SHA-256 digests, never logged)."""
    api_key_sha256: list[str] = Field(default_factory=list)
    """Hex SHA-256 digests of keys, for policy files that should not hold the keys."""
    limits: Limits | None = None
    """Overrides the policy's ``limits`` field by field."""


@dataclass(frozen=True, slots=True)
class TenantIndex:
    """What every request reads of a policy's tenants, as plain dicts: a pydantic private
    attribute costs about 2 µs a read."""

    by_digest: dict[str, str]
    """Tenant by API key digest."""
    limits: dict[str, Limits | None]
    default_limits: Limits | None


class Policy(_Strict):
    version: Literal[1] = 1
    """The policy format's version; 1 is the only one."""
    require_api_key: bool = False
    """Refuse requests whose key belongs to no tenant (401)."""
    default_budget_ms: float = Field(250.0, gt=0)
    """The time budget of a stage that neither its rule's ``budget_ms`` nor its class sets
    (every built-in stage sets its own)."""
    limits: Limits = Field(default_factory=Limits)
    """Every tenant's limits (see ``middleware/limits.py``); none by default."""
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    """Tenants by name; a request's tenant is resolved from its API key."""
    rules: list[Rule] = Field(default_factory=list)
    """Tried in order; the first whose ``match`` fits the request decides its stages (no match:
    no stage runs)."""

    @model_validator(mode="after")
    def _index_keys(self) -> Policy:
        _ = self.index  # built now: a key listed twice fails validation
        return self

    @cached_property
    def index(self) -> TenantIndex:
        by_digest: dict[str, str] = {}
        limits: dict[str, Limits | None] = {}
        for name, tenant in self.tenants.items():
            digests = [key_digest(k.get_secret_value()) for k in tenant.api_keys]
            digests += tenant.api_key_sha256
            for digest in digests:
                other = by_digest.setdefault(digest.lower(), name)
                if other != name:
                    raise ValueError(f"an API key is listed for tenants {other!r} and {name!r}")
            limits[name] = self.limits.under(tenant.limits).or_none()
        return TenantIndex(by_digest, limits, self.limits.or_none())

    def limits_for(self, tenant: str) -> Limits | None:
        """``tenant``'s limits; None when none applies (admission then costs nothing)."""
        index = self.index
        return index.limits.get(tenant, index.default_limits)

    def tenant_for_key(self, api_key: str | None) -> str | None:
        """The tenant owning ``api_key``.

        Without a key: ``anonymous``. A key no tenant lists becomes a tenant of its own
        (named after its digest), so that two unknown keys never share cached data; with
        ``require_api_key`` it is refused (None).
        """
        return self.listed_tenant(api_key) or self.unlisted_tenant(api_key)

    def listed_tenant(self, api_key: str | None) -> str | None:
        """The tenant that lists ``api_key`` in this policy, if any."""
        return self.index.by_digest.get(key_digest(api_key)) if api_key else None

    def unlisted_tenant(self, api_key: str | None) -> str | None:
        """The tenant of a key no tenant lists (see ``tenant_for_key``)."""
        if self.require_api_key:
            return None
        return f"key-{key_digest(api_key)[:16]}" if api_key else ANONYMOUS

    def stage_specs(self) -> list[tuple[str, BaseModel]]:
        """Every stage the rules run, with its validated settings."""
        return [(spec.use, spec.validated_settings) for rule in self.rules for spec in rule.stages]

    def rule_for(self, route: Route, model: str, tenant: str) -> tuple[int, Rule] | None:
        for index, rule in enumerate(self.rules):
            if rule.match.fits(route, model, tenant):
                return index, rule
        return None


DEFAULT_POLICY = """
# Used when no policy file is given: an exact result cache for every route and model.
rules:
  - name: default
    stages:
      - use: cache
"""


def uses_semantic_cache(policy: Policy) -> bool:
    return any(
        spec.use == "cache" and bool(getattr(spec.validated_settings, "semantic", False))
        for rule in policy.rules
        for spec in rule.stages
    )


class PolicyError(ValueError):
    """A policy file that cannot be read or is invalid; the message names the fields."""


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise PolicyError(f"{source}: nested too deeply to read") from None
    try:
        return Policy.model_validate(data or {})
    except ValidationError as exc:
        problems = validation_problems(exc, whole="(top level)")
        lines = [f"{source}: invalid policy", *(f"  {line}" for line in problems)]
        raise PolicyError("\n".join(lines)) from None


def load_policy(path: Path | None) -> Policy:
    """The policy in ``path``, or the default policy when there is none."""
    if path is None:
        return parse_policy(DEFAULT_POLICY, "<default policy>")
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc}") from None
    return parse_policy(text, str(path))
