"""Everything a running leangate holds, opened and closed in one place.

The proxy's lifespan (``app.py``) and the in-process SDK (``leangate.Pipeline``) both open
a ``Runtime``, so that the two run the same stages on the same services, built the same
way: metrics, the backend client, the shared embedder, the caches, the corpora, the
gateway and, when the policy comes from a file, its watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from leangate.backend.client import BackendClient
from leangate.backend.tokenizer import Tokenizer
from leangate.backend.transport import Transport
from leangate.cache.embedder import Embedder
from leangate.cache.services import CacheServices
from leangate.cache.store import open_store, redis_client
from leangate.middleware.chains import PolicyWatcher
from leangate.middleware.gateway import Gateway
from leangate.middleware.keys import KeyStore
from leangate.middleware.limits import Limiter
from leangate.middleware.metrics import Metrics
from leangate.middleware.policy import Policy, uses_semantic_cache
from leangate.middleware.registry import needs_of
from leangate.middleware.services import Services
from leangate.middleware.tracing import Tracing
from leangate.retrieval.corpora import Corpora, CorpusSettings
from leangate.settings import Settings


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    gateway: Gateway

    @property
    def services(self) -> Services:
        return self.gateway.services

    @property
    def metrics(self) -> Metrics:
        return self.gateway.services.metrics


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings,
    policy: Policy,
    transport: Transport | None = None,
    tracing: Tracing | None = None,
) -> AsyncIterator[Runtime]:
    """Open the services ``policy`` needs, yield the runtime, close everything on exit.
    ``tracing``: where spans go (default: OTLP when ``settings.otel``, else nowhere).

    What was opened is closed even when a later step of the start fails. The policy file
    (``settings.policy``), if any, is watched and reloaded while the runtime is open.
    """
    async with contextlib.AsyncExitStack() as stack:
        metrics = Metrics()
        backend = BackendClient(
            settings.backend_settings(), transport, metrics.backend_request_sent
        )
        stack.push_async_callback(backend.aclose)
        embedder = Embedder()
        cache = CacheServices(open_store(settings.redis_url), metrics, embedder)
        stack.push_async_callback(cache.close)
        await backend.start()
        if uses_semantic_cache(policy):
            await cache.start_semantic()
        corpora = Corpora(_corpus_settings(settings), embedder, settings.redis_url)
        stack.push_async_callback(corpora.aclose)
        await corpora.start()
        redis = _redis_client(settings.redis_url)
        if redis is not None:
            stack.push_async_callback(redis.aclose)
        limiter = Limiter(metrics, settings.redis_url, redis)
        if tracing is None and settings.otel:
            tracing = Tracing.start()
        if tracing is not None:
            stack.callback(tracing.shutdown)
        services = Services(
            backend=backend,
            metrics=metrics,
            cache=cache,
            embedder=embedder,
            tokenizer=Tokenizer(backend, settings.tokenizer_dirs),
            corpora=corpora,
            limiter=limiter,
            keys=KeyStore(redis) if redis is not None else None,
            tracing=tracing,
        )
        stack.push_async_callback(services.aclose)
        await services.prepare(needs_of(policy.stage_specs()))
        gateway = Gateway(services, policy)
        watch = _watch_policy(settings, gateway)
        if watch is not None:
            stack.push_async_callback(_cancel, watch)
        yield Runtime(settings, gateway)


def _redis_client(url: str | None) -> Any:
    """The client of API keys and limits (short timeouts: both sit on every request)."""
    return None if url is None else redis_client(url, timeout_s=0.5, wait_s=0.5)


def _corpus_settings(settings: Settings) -> CorpusSettings:
    if settings.corpus_dir is None:
        return CorpusSettings()
    return CorpusSettings(root=settings.corpus_dir)


def _watch_policy(settings: Settings, gateway: Gateway) -> asyncio.Task[None] | None:
    if settings.policy is None:
        return None
    metrics = gateway.services.metrics

    def changed(policy: Policy | None) -> None:
        if policy is None:
            metrics.policy_reloads.labels("rejected").inc()
            return
        gateway.use_policy(policy)
        prepare = gateway.services.prepare(needs_of(policy.stage_specs()))
        asyncio.create_task(prepare, name="prepare-services")  # noqa: RUF006
        if uses_semantic_cache(policy):
            gateway.services.cache.semantic()  # starts loading the embedding model
        metrics.policy_reloads.labels("applied").inc()

    watcher = PolicyWatcher(settings.policy, changed, settings.policy_reload_s)
    return asyncio.create_task(watcher.run(), name="policy-watcher")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
