"""An async client for a pool of OpenAI-compatible servers (vLLM first).

One pooled transport carries the requests to every replica. Replicas are health-checked in
the background through ``GET /v1/models``, which also tells which models each one serves,
and their load is read from ``/metrics``; both go through a small transport of their own
(see ``BackendClient``). A request goes to the replica chosen by ``balancer.choose`` and is
retried on another replica only when the connection failed before any byte was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from leangate.backend.balancer import Replica, choose
from leangate.backend.errors import (
    BackendConnectError,
    BackendError,
    BackendProtocolError,
    BackendStatusError,
    BackendUnavailable,
    ModelNotFound,
)
from leangate.backend.profile import BackendProfile
from leangate.backend.transport import (
    KEEPALIVE_S,
    AiohttpTransport,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
)

log = logging.getLogger(__name__)

JSON_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}
REQUEST_ID_HEADER = "x-request-id"


class BackendSettings(BaseModel):
    """How the proxy talks to its backend replicas."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000"], min_length=1)
    api_key: SecretStr | None = None
    timeout_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    health_interval_s: float = Field(5.0, gt=0)
    health_timeout_s: float = Field(3.0, gt=0)
    health_failures: int = Field(2, ge=1)
    """Consecutive slow or malformed health answers before a replica is taken out. A
    refused connection takes it out at once; a busy server on few cores can miss one
    check's deadline while it is serving well, and one miss must not turn every request
    into a 503 until the next check."""
    max_retries: int = Field(2, ge=0)
    load_poll_s: float = Field(2.0, ge=0)
    """How often the backend profile reads each replica's /metrics for its load (0: never)."""
    affinity_slack: int = Field(4, ge=1)
    affinity_prefix_chars: int = Field(512, ge=0)
    keepalive_s: float = Field(KEEPALIVE_S, gt=0)
    """How long an idle connection to a replica is kept open (see ``KEEPALIVE_S``)."""
    transport: Literal["lean", "aiohttp"] = "lean"
    """``lean``: asyncio protocols and httptools (``backend/lean.py``), for plain http
    replicas (https ones go through aiohttp); ``aiohttp``: its general-purpose client."""


class _TrackedResponse(UpstreamResponse):
    """Counts the request as outstanding on its replica until the body is released."""

    def __init__(self, inner: UpstreamResponse, replica: Replica) -> None:
        self._inner = inner
        self._replica: Replica | None = replica
        self.status = inner.status
        self.headers = inner.headers

    def _release(self) -> None:
        if self._replica is not None:
            self._replica.outstanding -= 1
            self._replica = None

    async def read(self) -> bytes:
        try:
            return await self._inner.read()
        finally:
            self._release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner.iter_chunks():
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._release()


class BackendClient:
    """Sends OpenAI API requests to the healthiest suitable replica.

    Health checks and load polls go through a transport of their own (``_probes``, two
    connections per replica at most), not the requests' pool: aiohttp hands out the idle
    connection that waited longest, so a poll every 2 s touched each idle request
    connection in turn and none ever aged out (``leangate bench load --soak``: 20 backend
    sockets left of 1 before, 75 s after the load). A ``transport`` given to the client
    (tests) carries both.
    """

    def __init__(
        self,
        settings: BackendSettings,
        transport: Transport | None = None,
        on_send: Callable[[str], None] | None = None,
    ) -> None:
        """``on_send`` is told the replica URL of every request sent (for metrics)."""
        self.settings = settings
        self._on_send = on_send
        self.replicas = [Replica(url.rstrip("/").removesuffix("/v1")) for url in settings.urls]
        self._transport = transport or _requests_transport(settings)
        self._probes = transport or AiohttpTransport(
            connect_timeout_s=settings.connect_timeout_s,
            pool_size=2 * len(self.replicas),
            keepalive_s=settings.keepalive_s,
        )
        self._headers = dict(JSON_HEADERS)
        self._tag = secrets.token_hex(3)
        """This client's part of the request ids it sends (replicas of the proxy differ)."""
        self._calls = itertools.count()
        if settings.api_key:
            self._headers["authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._health_task: asyncio.Task[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self.profile = BackendProfile()

    # --- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        """Check every replica once, then keep checking in the background."""
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="backend-health")
        if self.settings.load_poll_s > 0:
            self._load_task = asyncio.create_task(self._load_loop(), name="backend-load")

    async def aclose(self) -> None:
        for task in (self._health_task, self._load_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._transport.aclose()
        if self._probes is not self._transport:
            await self._probes.aclose()

    async def _load_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.load_poll_s)
            try:
                texts = await asyncio.gather(
                    *(self._metrics_text(r) for r in self.replicas if r.healthy)
                )
                self.profile.read_metrics(texts)
            except Exception as exc:
                log.debug("reading the replicas' /metrics failed: %r", exc)

    async def _metrics_text(self, replica: Replica) -> str:
        request = UpstreamRequest(
            "GET", f"{replica.url}/metrics", timeout_s=self.settings.health_timeout_s
        )
        response = await self._probes.send(request)
        body = await response.read()
        return body.decode(errors="replace") if response.status == 200 else ""

    async def _health_loop(self) -> None:
        """Runs until cancelled: an unexpected failure of one round is logged, and the next
        round runs as usual (a dead loop would leave replicas marked unhealthy for good)."""
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.check_health()
            except Exception:
                log.exception("backend health check failed unexpectedly")

    async def check_health(self) -> None:
        await asyncio.gather(*(self._check_replica(r) for r in self.replicas))

    async def _check_replica(self, replica: Replica) -> None:
        request = UpstreamRequest(
            "GET",
            f"{replica.url}/v1/models",
            headers=self._headers,
            timeout_s=self.settings.health_timeout_s,
        )
        try:
            response = await self._probes.send(request)
            body = await response.read()
            if response.status != 200:
                raise BackendProtocolError(f"health check answered HTTP {response.status}")
            cards = json.loads(body)["data"]
            models = frozenset(str(card["id"]) for card in cards)
        except (BackendError, ValueError, KeyError, TypeError) as exc:
            replica.failed_checks += 1
            refused = isinstance(exc, BackendConnectError)
            given_up = refused or replica.failed_checks >= self.settings.health_failures
            if replica.healthy and given_up:
                log.warning("replica %s is unhealthy: %s", replica.url, exc)
                replica.healthy = False
            return
        replica.failed_checks = 0
        replica.model_cards = cards
        replica.models = models
        replica.healthy = True

    # --- queries ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def model_cards(self) -> list[dict[str, object]]:
        """The models served by healthy replicas, each listed once."""
        seen: dict[object, dict[str, object]] = {}
        for replica in self.replicas:
            if replica.healthy:
                for card in replica.model_cards:
                    seen.setdefault(card.get("id"), card)
        return list(seen.values())

    def outstanding(self, model: str) -> int:
        """Requests this proxy has in flight to the replicas serving ``model``."""
        return sum(r.outstanding for r in self.replicas if model in r.models)

    def batch_size(self, model: str) -> float:
        """Sequences the backend is running now, as far as this proxy can tell: its own
        requests, or the replicas' last reported load when other clients add to them."""
        return max(float(self.outstanding(model)), self.profile.reported_load)

    def serves(self, model: str) -> bool:
        return any(r.serves(model) for r in self.replicas)

    def candidates(self, model: str) -> list[Replica]:
        """Healthy replicas serving ``model``; raises if there are none."""
        found = [r for r in self.replicas if r.serves(model)]
        if found:
            return found
        if not self.ready:
            raise BackendUnavailable("no backend replica is healthy")
        raise ModelNotFound(model)

    # --- requests --------------------------------------------------------------------------

    async def send(
        self,
        path: str,
        body: bytes,
        *,
        model: str,
        stream: bool,
        affinity_key: Callable[[], bytes | None] | None = None,
        request_id: str | None = None,
    ) -> UpstreamResponse:
        """POST ``body`` to ``path`` on a suitable replica.

        Returns the response once its headers have arrived with a 2xx status. An error
        status raises ``BackendStatusError`` with the server's body kept verbatim.
        ``affinity_key`` gives the prompt prefix when there are replicas to choose from.
        ``request_id`` (the client's ``x-request-id``) goes to the server as its
        ``X-Request-Id`` with a suffix unique to this call: vLLM names the request after it
        (its logs, the answer's ``id``) and needs it unique, and one client request may
        make several calls.
        """
        headers = self._headers
        if request_id is not None:
            headers = {
                **headers,
                REQUEST_ID_HEADER: f"{request_id}-{self._tag}{next(self._calls):x}",
            }
        tried: set[int] = set()
        while True:
            pool = [r for r in self.candidates(model) if id(r) not in tried] or None
            if pool is None:
                raise BackendUnavailable("every backend replica refused the connection")
            replica = choose(pool, affinity_key, self.settings.affinity_slack)
            request = UpstreamRequest(
                "POST",
                replica.url + path,
                body,
                headers,
                self.settings.timeout_s,
                stream,
            )
            replica.outstanding += 1
            if self._on_send is not None:
                self._on_send(replica.url)
            try:
                response = await self._transport.send(request)
            except BackendConnectError:
                replica.outstanding -= 1
                replica.healthy = False
                tried.add(id(replica))
                if len(tried) > self.settings.max_retries:
                    raise
                continue
            except BaseException:
                replica.outstanding -= 1
                raise
            tracked = _TrackedResponse(response, replica)
            if response.status >= 400:
                content = await tracked.read()
                content_type = response.headers.get("content-type", "application/json")
                raise BackendStatusError(response.status, content, content_type)
            return tracked


def _requests_transport(settings: BackendSettings) -> Transport:
    """The transport ``settings`` ask for; aiohttp when a replica is reached over https,
    which the lean transport does not speak."""
    plain = all(url.startswith("http://") for url in settings.urls)
    if settings.transport == "lean" and plain:
        from leangate.backend.lean import LeanTransport

        return LeanTransport(
            connect_timeout_s=settings.connect_timeout_s, keepalive_s=settings.keepalive_s
        )
    return AiohttpTransport(
        connect_timeout_s=settings.connect_timeout_s, keepalive_s=settings.keepalive_s
    )
