"""Choosing a replica: least outstanding requests, with prompt-prefix affinity.

Requests that share a prompt prefix go to the same replica so that vLLM's automatic prefix
cache hits there. Affinity yields to load: when the preferred replica has ``slack`` more
requests in flight than the least-loaded one, the least-loaded one wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Replica:
    """One backend server and what the client knows of it."""

    url: str
    healthy: bool = False
    models: frozenset[str] = frozenset()
    outstanding: int = 0
    model_cards: list[dict[str, object]] = field(default_factory=list)

    def serves(self, model: str) -> bool:
        return self.healthy and model in self.models


def _rendezvous_score(key: bytes, replica: Replica) -> bytes:
    return hashlib.blake2b(key + replica.url.encode(), digest_size=8).digest()


def choose(candidates: Sequence[Replica], affinity_key: bytes | None, slack: int = 4) -> Replica:
    """Pick one of ``candidates`` (which must not be empty)."""
    least = min(candidates, key=lambda r: r.outstanding)
    if affinity_key is None or len(candidates) == 1:
        return least
    preferred = max(candidates, key=lambda r: _rendezvous_score(affinity_key, r))
    if preferred.outstanding - least.outstanding >= slack:
        return least
    return preferred
