"""The semantic cache: nearest earlier questions, kept in sync across proxy replicas.

Entries live in the store (Redis) as the source of truth. Each replica holds a faiss index
of them, built from the store at start-up and kept current by reading the store's event
log, so an entry one replica adds is searchable on the others within one poll (well under
a second). An entry whose answer has expired is dropped from the index when a lookup finds
it gone.

Besides its sentence vector, an entry keeps the embeddings of its content tokens (float16,
about 20 KB for a typical question), which the verifier aligns with the query's to choose
between near-duplicate entries.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from leangate.cache.embedder import Embedder, Embedding
from leangate.cache.keys import PREFIX, SEMANTIC_EVENTS, SEMANTIC_INDEX
from leangate.cache.store import Store, StoreError
from leangate.cache.vector_index import VectorIndex
from leangate.cache.verify import Verdict, Verifier

log = logging.getLogger(__name__)

SYNC_BLOCK_MS = 200
SWEEP_INTERVAL_S = 60.0
SWEEP_BATCH = 1000
SEARCH_K = 4


@dataclass(frozen=True, slots=True)
class Entry:
    scope: str
    text: str
    answer_key: str

    def encode(self, vector: np.ndarray | Embedding) -> bytes:
        """JSON with the base64 float32 vector and, if known, the float16 token rows."""
        embedding = vector if isinstance(vector, Embedding) else Embedding(vector)
        data = {
            "scope": self.scope,
            "text": self.text,
            "answer": self.answer_key,
            "vec": _pack(embedding.vector, np.float32),
        }
        if embedding.tokens is not None:
            data["tok"] = _pack(embedding.tokens, np.float16)
        return orjson.dumps(data)

    @staticmethod
    def decode(raw: bytes) -> tuple[Entry, np.ndarray]:
        entry, embedding = Entry.decode_embedding(raw)
        return entry, embedding.vector

    @staticmethod
    def decode_embedding(raw: bytes) -> tuple[Entry, Embedding]:
        """Like :meth:`decode`, with the token rows (None for entries stored without them)."""
        data = orjson.loads(raw)
        vector = np.frombuffer(base64.b64decode(data["vec"]), dtype=np.float32)
        tokens = None
        if data.get("tok"):
            flat = np.frombuffer(base64.b64decode(data["tok"]), dtype=np.float16)
            tokens = flat.reshape(-1, vector.shape[0])
        entry = Entry(data["scope"], data["text"], data["answer"])
        return entry, Embedding(vector, tokens)


def _pack(array: np.ndarray, dtype: type[np.floating[Any]]) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


@dataclass(frozen=True, slots=True)
class Match:
    key: str
    entry: Entry
    verdict: Verdict


class SemanticSettings(BaseSettings):
    """The semantic cache's process-wide settings (``LEANGATE_SEMANTIC_*``): one index is
    shared by every policy rule, so its bound is the process's, not a stage's."""

    model_config = SettingsConfigDict(env_prefix="LEANGATE_SEMANTIC_", extra="ignore")

    max_entries: int = Field(20_000, gt=0)
    """Entries kept across all tenants; beyond it the oldest go, on every replica."""


class SemanticCache:
    """Embeds questions, finds and verifies neighbours, and stores new entries."""

    def __init__(
        self, store: Store, embedder: Embedder, settings: SemanticSettings | None = None
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.settings = settings or SemanticSettings()
        self.max_entries = self.settings.max_entries
        self.index = VectorIndex(embedder.dim)
        self._entries: dict[str, Entry] = {}
        self._tokens: dict[str, np.ndarray | None] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_event = "0-0"

    # --- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model, index every stored entry, then follow the event log."""
        await asyncio.to_thread(self._load_and_warm_up)
        self._last_event = await self.store.last_event_id(SEMANTIC_EVENTS)
        async for key in self.store.scan(f"{PREFIX}:*:*:sem:*"):
            await self._load(key)
        self._sync_task = asyncio.create_task(self._follow(), name="semantic-sync")

    def _load_and_warm_up(self) -> None:
        """Load the model and run it once per input length: the first pass at each new
        length builds kernels, which would otherwise land on the first requests."""
        self.embedder.load()
        for words in range(1, 48, 3):
            self.embedder.encode([" ".join(["warm"] * words)])

    async def close(self) -> None:
        """Stop following the event log.

        The follower is asked to stop and given one blocking read to notice. Cancelling a
        blocked ``XREAD`` can leave redis-py waiting on its connection indefinitely, so
        cancellation is only the fallback, and it is not waited for beyond a second.
        """
        self._closing = True
        task = self._sync_task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=3 * SYNC_BLOCK_MS / 1000)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def _follow(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        failing = False
        while not self._closing:
            try:
                events = await self.store.read_events(
                    SEMANTIC_EVENTS, self._last_event, SYNC_BLOCK_MS
                )
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                    await self.sweep()
            except StoreError as exc:
                if not failing:  # once per outage, not once a second
                    log.warning("semantic sync paused: %s", exc)
                failing = True
                await asyncio.sleep(1.0)
                continue
            failing = False
            for event in events:
                self._last_event = event.id
                if event.op == "add" and event.key not in self._entries:
                    with contextlib.suppress(StoreError):
                        await self._load(event.key)
                elif event.op == "del":
                    self._forget(event.key)

    async def sweep(self) -> int:
        """Forget entries whose TTL ran out in the store; returns how many.

        Expiry in Redis sends no event, so without this the index would keep entries that
        no lookup happens to find gone.
        """
        keys = list(self._entries)
        gone = 0
        for start in range(0, len(keys), SWEEP_BATCH):
            batch = keys[start : start + SWEEP_BATCH]
            for key, present in zip(batch, await self.store.exists(batch), strict=True):
                if not present:
                    self._forget(key)
                    gone += 1
        return gone

    async def _load(self, key: str) -> None:
        raw = await self.store.get(key)
        if raw is None:
            return
        entry, embedding = Entry.decode_embedding(raw)
        self._remember(key, entry, embedding)

    def _remember(self, key: str, entry: Entry, embedding: Embedding) -> None:
        self._entries[key] = entry
        self._tokens[key] = embedding.tokens
        self.index.add(entry.scope, key, embedding.vector)

    def _forget(self, key: str) -> None:
        self._entries.pop(key, None)
        self._tokens.pop(key, None)
        self.index.remove(key)

    # --- requests --------------------------------------------------------------------------

    async def embed(self, text: str) -> Embedding:
        """The query's sentence vector and content-token embeddings (one forward pass)."""
        embeddings = await self.embedder.aencode([text])
        return embeddings[0]

    def nearest(
        self, scope: str, text: str, vector: np.ndarray | Embedding, verifier: Verifier
    ) -> Match | None:
        """The neighbour in ``scope`` the verifier picks (accepted), else the nearest (rejected).

        None when ``scope`` has no entries.
        """
        embedding = vector if isinstance(vector, Embedding) else Embedding(vector)
        keys: list[str] = []
        scores: dict[str, float] = {}
        seen: set[str] = set()
        for n in self.index.search(scope, embedding.vector, k=SEARCH_K):
            entry = self._entries.get(n.entry_id)
            if entry is not None and entry.text not in seen:  # equal texts: one answer
                seen.add(entry.text)
                keys.append(n.entry_id)
                scores[n.entry_id] = n.score
        if not keys:
            return None
        selection = verifier.select(
            text,
            [(self._entries[key].text, scores[key]) for key in keys],
            query_tokens=embedding.tokens,
            neighbor_tokens=[self._tokens.get(key) for key in keys],
        )
        key = keys[0 if selection.index is None else selection.index]
        return Match(key, self._entries[key], selection.verdict)

    async def drop(self, key: str) -> None:
        """Forget an entry whose answer is gone, here and on every replica."""
        self._forget(key)
        await self.store.delete(key)
        await self.store.publish(SEMANTIC_EVENTS, "del", key)

    async def add(
        self, key: str, entry: Entry, vector: np.ndarray | Embedding, ttl_s: float
    ) -> None:
        embedding = vector if isinstance(vector, Embedding) else Embedding(vector)
        size = await self.store.add_announced(
            key,
            entry.encode(embedding),
            ttl_s,
            stream=SEMANTIC_EVENTS,
            index=SEMANTIC_INDEX,
            score=time.time(),
        )
        # After the store has it (a sweep meanwhile would find it missing and forget it);
        # should this replica's follower read the event first, it loads the entry itself.
        self._remember(key, entry, embedding)
        if size > self.max_entries:
            for old in await self.store.index_pop_oldest(SEMANTIC_INDEX, size - self.max_entries):
                await self.drop(old)

    def __len__(self) -> int:
        return len(self._entries)
