"""The long-lived resources stages share, opened once in the app's lifespan.

Nothing here loads a model when it is built: the embedder loads on first use (or in the
lifespan, when a policy needs it), and the tokenizer reads a local tokenizer file only for
a model that is asked about.
"""

from __future__ import annotations

from dataclasses import dataclass

from leangate.backend.client import BackendClient
from leangate.backend.profile import BackendProfile
from leangate.backend.tokenizer import Tokenizer
from leangate.cache.embedder import Embedder
from leangate.cache.services import CacheServices
from leangate.middleware.metrics import Metrics


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

    @property
    def profile(self) -> BackendProfile:
        """The backend's measured speeds and load, with ``predict`` for cost models."""
        return self.backend.profile
