"""The long-lived resources stages share, opened in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leangate.backend.client import BackendClient
from leangate.middleware.metrics import Metrics


@dataclass
class Services:
    backend: BackendClient
    metrics: Metrics
    extras: dict[str, Any] = field(default_factory=dict)
    """Resources added by capabilities (the cache store, the embedder), by name."""
