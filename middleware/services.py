"""The long-lived resources stages share, opened once in the app's lifespan.

Nothing here loads a model when it is built: the embedder loads on first use (or in the
lifespan, when a policy needs it), and the tokenizer reads a local tokenizer file only for
a model that is asked about.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from leangate.backend.client import BackendClient
from leangate.backend.profile import BackendProfile
from leangate.backend.tokenizer import Tokenizer
from leangate.cache.embedder import Embedder
from leangate.cache.services import CacheServices
from leangate.middleware.keys import KeyStore
from leangate.middleware.limits import Limiter
from leangate.middleware.metrics import Metrics
from leangate.middleware.tracing import Tracing
from leangate.retrieval.corpora import Corpora

log = logging.getLogger(__name__)

CALIBRATION_RETRY_S = 10.0


@dataclass
class Services:
    backend: BackendClient
    metrics: Metrics
    cache: CacheServices
    """The result cache's store and helpers; also the intermediate-result cache's."""
    embedder: Embedder
    """The one sentence embedder (all-MiniLM-L6-v2) of the cache, RAG, compression and
    the routers; concurrent callers are batched."""
    tokenizer: Tokenizer
    """Token counts for the served models (exact, or a fast estimate for budgets)."""
    corpora: Corpora | None = None
    """The tenants' named corpora (``retrieval/corpora.py``), opened in the lifespan."""
    limiter: Limiter | None = None
    """Per-tenant limits' counters (in Redis when one is configured)."""
    keys: KeyStore | None = None
    """API keys kept in Redis (only when one is configured)."""
    tracing: Tracing | None = None
    """OpenTelemetry spans (``LEANGATE_OTEL``); None: off."""

    _calibration: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    @property
    def profile(self) -> BackendProfile:
        """The backend's measured speeds and load, with ``predict`` for cost models."""
        return self.backend.profile

    async def prepare(self, needs: Iterable[str]) -> None:
        """Open what the policy's stages declared they need (``Stage.needs``) before the
        first request: the embedder is loaded now; the backend profile is calibrated in
        the background (cost-aware stages answer directly until it is)."""
        wanted = set(needs)
        if "embedder" in wanted and not self.embedder.loaded:
            await asyncio.to_thread(self.embedder.load)
        if "tokenizer" in wanted:
            await asyncio.to_thread(self.tokenizer.load_local)
        if "profile" in wanted and self._calibration is None and not self.profile.calibrated:
            self._calibration = asyncio.create_task(self._calibrate(), name="profile-calibration")

    async def _calibrate(self) -> None:
        while True:
            try:
                model = str(self.backend.model_cards()[0]["id"])  # IndexError: none ready
                await self.profile.calibrate(self.backend, model)
                log.info("backend profile calibrated on %s: %s", model, self.profile.estimate)
                return
            except Exception as exc:
                log.warning("calibrating the backend profile failed, retrying: %r", exc)
                await asyncio.sleep(CALIBRATION_RETRY_S)

    async def aclose(self) -> None:
        if self._calibration is not None:
            self._calibration.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._calibration
