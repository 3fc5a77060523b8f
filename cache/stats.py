"""How many entries the result cache holds, by tenant and/or namespace (admin API and CLI).

Counted with ``SCAN`` (Redis answers other clients between batches), so a count taken while
entries come and go is approximate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from leangate.cache.keys import scope_prefix
from leangate.cache.store import Store


@dataclass(frozen=True, slots=True)
class EntryCounts:
    answers: int
    """Stored answers (served by exact and semantic hits)."""
    semantic: int
    """Semantic entries (each points at an answer)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


async def count_entries(
    store: Store, *, tenant: str | None = None, namespace: str | None = None
) -> EntryCounts:
    answers = semantic = 0
    async for key in store.scan(scope_prefix(tenant, namespace) + "*"):
        kind = key.rsplit(":", 2)[-2]
        answers += kind == "ans"
        semantic += kind == "sem"
    return EntryCounts(answers, semantic)
