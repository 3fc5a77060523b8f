"""Coalescing identical misses: one request goes to the backend, the others wait for it."""

from __future__ import annotations

import asyncio


class SingleFlight:
    """In-flight calls by key. The leader ``finish``es with the stored answer's bytes, or
    with None when it failed, in which case each follower goes to the backend itself."""

    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Future[bytes | None]] = {}

    def join(self, key: str) -> asyncio.Future[bytes | None] | None:
        """The leader's future if a call for ``key`` is in flight; otherwise the caller
        becomes the leader (returns None) and must call ``finish``."""
        running = self._calls.get(key)
        if running is not None:
            return running
        self._calls[key] = asyncio.get_running_loop().create_future()
        return None

    def finish(self, key: str, answer: bytes | None) -> None:
        future = self._calls.pop(key, None)
        if future is not None and not future.done():
            future.set_result(answer)

    def __len__(self) -> int:
        return len(self._calls)
