"""Choosing a replica: least outstanding requests, with prompt-prefix affinity.

Requests that share a prompt prefix go to the same replica so that vLLM's automatic prefix
cache hits there. Affinity yields to load: when the preferred replica has ``slack`` more
requests in flight than the least-loaded one, the least-loaded one wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Replica:
    """One backend server and what the client knows of it."""

    url: str
    healthy: bool = False
    models: frozenset[str] = frozenset()
    outstanding: int = 0
    failed_checks: int = 0
    """Health checks failed in a row (see ``BackendSettings.health_failures``)."""
    model_cards: list[dict[str, object]] = field(default_factory=list)

    def serves(self, model: str) -> bool:
        return self.healthy and model in self.models


def _rendezvous_score(key: bytes, replica: Replica) -> bytes:
    return hashlib.blake2b(key + replica.url.encode(), digest_size=8).digest()


def choose(
    candidates: Sequence[Replica],
    affinity_key: Callable[[], bytes | None] | None = None,
    slack: int = 4,
) -> Replica:
    """Pick one of ``candidates`` (which must not be empty).

    ``affinity_key`` is called only when there is a choice to make: computing it costs
    more than the rest of the decision on a single-replica deployment.
    """
    if len(candidates) == 1:
        return candidates[0]
    least = min(candidates, key=lambda r: r.outstanding)
    key = affinity_key() if affinity_key is not None else None
    if key is None:
        return least
    preferred = max(candidates, key=lambda r: _rendezvous_score(key, r))
    if preferred.outstanding - least.outstanding >= slack:
        return least
    return preferred
