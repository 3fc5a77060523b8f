"""Turning a policy into ready-built chains, and reloading the policy when its file changes.

Stages are built once per policy rule. The chain for a rule, and for each narrower set of
stages a request asked for, is built the first time it is needed and then reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from leangate.middleware.pipeline import Handler, Stage, build_chain
from leangate.middleware.policy import Policy, PolicyError, Rule, load_policy
from leangate.middleware.protocol import RequestOptions, Route
from leangate.middleware.registry import known_stages, stage_class
from leangate.middleware.services import Services

log = logging.getLogger(__name__)

StageList = list[tuple[Stage, float | None]]
PolicyCallback = Callable[[Policy | None], None]
"""Called with the new policy, or with None when a reload was rejected."""


class ChainBook:
    """The chains of one policy."""

    def __init__(self, policy: Policy, services: Services, endpoint: Handler) -> None:
        self.policy = policy
        self._services = services
        tracing = services.tracing
        self._endpoint = endpoint if tracing is None else tracing.backend_calls(endpoint)
        self._stages = [self._build_stages(rule) for rule in policy.rules]
        self._chains: dict[tuple[int, frozenset[str] | None], Handler] = {}

    def _build_stages(self, rule: Rule) -> StageList:
        built: StageList = []
        for spec in rule.stages:
            cls = stage_class(spec.use)
            stage: Stage = cls(spec.use, spec.validated_settings, self._services)
            budget_ms = spec.budget_ms or cls.default_budget_ms or self.policy.default_budget_ms
            built.append((stage, budget_ms / 1000))
        return built

    def chain_for(
        self, route: Route, model: str, tenant: str, options: RequestOptions | None
    ) -> Handler:
        found = self.policy.rule_for(route, model, tenant)
        if found is None:
            return self._endpoint
        index, _ = found
        wanted = _narrowing(options)
        key = (index, wanted)
        chain = self._chains.get(key)
        if chain is None:
            stages = self._stages[index]
            if wanted is not None:
                stages = [(s, b) for s, b in stages if s.name in wanted]
            services = self._services
            chain = build_chain(stages, self._endpoint, services.metrics, services.tracing)
            self._chains[key] = chain
        return chain


def _narrowing(options: RequestOptions | None) -> frozenset[str] | None:
    """The stage names a request allows, or None for all of the policy's."""
    if options is None or (options.stages is None and not options.disable):
        return None
    allowed = frozenset(options.stages) if options.stages is not None else frozenset(known_stages())
    return allowed - frozenset(options.disable)


SETTLE_S = 0.5
"""A changed policy file is loaded once it has stayed the same this long."""


class PolicyWatcher:
    """Reloads the policy file when it changes; an invalid file leaves the old one in place.

    ``run`` loads a changed file only once it has settled (unchanged for ``SETTLE_S``): a
    file written in place is truncated first, and its first lines are often a valid
    policy of their own, one without the tenants or the key requirement further down. A
    writer that pauses longer than that mid-file still gets its half applied: writing a
    new file and renaming it over the old one is the safe way (a rename is atomic).
    """

    def __init__(self, path: Path, on_change: PolicyCallback, interval_s: float = 1.0) -> None:
        self.path = path
        self._on_change = on_change
        self._interval_s = interval_s
        self._stamp = self._read_stamp()
        self._changed: tuple[tuple[float, int] | None, float] | None = None
        """The file's new stamp, and when it was first seen."""
        self.last_error: str | None = None

    def _read_stamp(self) -> tuple[float, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime, stat.st_size)

    def check(self) -> bool:
        """Reload if the file changed since the last look; True if a new policy took over."""
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy reload rejected, keeping the previous policy:\n%s", exc)
            self._on_change(None)
            return False
        self.last_error = None
        log.info("policy reloaded from %s", self.path)
        self._on_change(policy)
        return True

    def settled(self) -> bool:
        """False while the file has changed within the last ``SETTLE_S``."""
        stamp = self._read_stamp()
        if stamp == self._stamp:
            self._changed = None
            return True
        now = time.monotonic()
        if self._changed is None or self._changed[0] != stamp:
            self._changed = (stamp, now)
        return now - self._changed[1] >= SETTLE_S

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if self.settled():
                self.check()
