"""The long-lived resources stages share, opened in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from leangate.backend.client import BackendClient
from leangate.cache.services import CacheServices
from leangate.middleware.metrics import Metrics


@dataclass
class Services:
    backend: BackendClient
    metrics: Metrics
    cache: CacheServices
    """The result cache's store and helpers; also the intermediate-result cache's."""
