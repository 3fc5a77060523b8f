"""The semantic cache: nearest earlier questions, kept in sync across proxy replicas.

Entries live in the store (Redis) as the source of truth. Each replica holds a faiss index
of them, built from the store at start-up and kept current by reading the store's event
log, so an entry one replica adds is searchable on the others within one poll (well under
a second). An entry whose answer has expired is dropped from the index when a lookup finds
it gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import orjson

from leangate.cache.embedder import Embedder
from leangate.cache.keys import PREFIX, SEMANTIC_EVENTS, SEMANTIC_INDEX
from leangate.cache.store import Store, StoreError
from leangate.cache.vector_index import VectorIndex
from leangate.cache.verify import Verdict, Verifier

log = logging.getLogger(__name__)

SYNC_BLOCK_MS = 200


@dataclass(frozen=True, slots=True)
class Entry:
    scope: str
    text: str
    answer_key: str

    def encode(self, vector: np.ndarray) -> bytes:
        packed = base64.b64encode(vector.astype(np.float32).tobytes()).decode()
        return orjson.dumps(
            {"scope": self.scope, "text": self.text, "answer": self.answer_key, "vec": packed}
        )

    @staticmethod
    def decode(raw: bytes) -> tuple[Entry, np.ndarray]:
        data = orjson.loads(raw)
        vector = np.frombuffer(base64.b64decode(data["vec"]), dtype=np.float32)
        return Entry(data["scope"], data["text"], data["answer"]), vector


@dataclass(frozen=True, slots=True)
class Match:
    key: str
    entry: Entry
    verdict: Verdict


class SemanticCache:
    """Embeds questions, finds and verifies neighbours, and stores new entries."""

    def __init__(self, store: Store, embedder: Embedder, *, max_entries: int = 100_000) -> None:
        self.store = store
        self.embedder = embedder
        self.max_entries = max_entries
        self.index = VectorIndex(embedder.dim)
        self._entries: dict[str, Entry] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._last_event = "0-0"

    # --- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model, index every stored entry, then follow the event log."""
        await asyncio.to_thread(self.embedder.load)
        self._last_event = await self.store.last_event_id(SEMANTIC_EVENTS)
        async for key in self.store.scan(f"{PREFIX}:*:*:sem:*"):
            await self._load(key)
        self._sync_task = asyncio.create_task(self._follow(), name="semantic-sync")

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task

    async def _follow(self) -> None:
        while True:
            try:
                events = await self.store.read_events(
                    SEMANTIC_EVENTS, self._last_event, SYNC_BLOCK_MS
                )
            except StoreError as exc:
                log.warning("semantic sync paused: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for event in events:
                self._last_event = event.id
                if event.op == "add" and event.key not in self._entries:
                    with contextlib.suppress(StoreError):
                        await self._load(event.key)
                elif event.op == "del":
                    self._forget(event.key)

    async def _load(self, key: str) -> None:
        raw = await self.store.get(key)
        if raw is None:
            return
        entry, vector = Entry.decode(raw)
        self._remember(key, entry, vector)

    def _remember(self, key: str, entry: Entry, vector: np.ndarray) -> None:
        self._entries[key] = entry
        self.index.add(entry.scope, key, vector)

    def _forget(self, key: str) -> None:
        self._entries.pop(key, None)
        self.index.remove(key)

    # --- requests --------------------------------------------------------------------------

    async def embed(self, text: str) -> np.ndarray:
        vectors = await self.embedder.aembed([text])
        vector: np.ndarray = vectors[0]
        return vector

    def nearest(
        self, scope: str, text: str, vector: np.ndarray, verifier: Verifier
    ) -> Match | None:
        """The best neighbour in ``scope`` if the verifier accepts it."""
        neighbors = [
            n for n in self.index.search(scope, vector, k=4) if n.entry_id in self._entries
        ]
        if not neighbors:
            return None
        best = neighbors[0]
        entry = self._entries[best.entry_id]
        runner_up = next(
            (n.score for n in neighbors[1:] if self._entries[n.entry_id].text != entry.text), None
        )
        verdict = verifier.check(text, entry.text, best.score, runner_up)
        return Match(best.entry_id, entry, verdict)

    async def drop(self, key: str) -> None:
        """Forget an entry whose answer is gone, here and on every replica."""
        self._forget(key)
        await self.store.delete(key)
        await self.store.publish(SEMANTIC_EVENTS, "del", key)

    async def add(self, key: str, entry: Entry, vector: np.ndarray, ttl_s: float) -> None:
        await self.store.set(key, entry.encode(vector), ttl_s)
        self._remember(key, entry, vector)
        await self.store.publish(SEMANTIC_EVENTS, "add", key)
        size = await self.store.index_add(SEMANTIC_INDEX, key, time.time())
        if size > self.max_entries:
            for old in await self.store.index_pop_oldest(SEMANTIC_INDEX, size - self.max_entries):
                await self.drop(old)

    def __len__(self) -> int:
        return len(self._entries)
