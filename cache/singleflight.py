"""Coalescing identical misses: one request goes to the backend, the others follow it.

The leader's answer is broadcast as it arrives: a streamed answer's events are kept in its
``Flight`` while the leader's stream runs, so a follower replays what was already seen and
then follows live, instead of waiting for the whole answer.
"""

from __future__ import annotations

import asyncio


class Flight:
    """One in-flight miss: its stream's events so far, then its end.

    ``answer`` is the whole answer's bytes (JSON, the stored form) once the leader
    finished with a storable one, else None. ``failed`` says the leader's answer did not
    complete (an error, a stream cut short or never read); ``error`` is what the leader's
    backend call raised, if anything.
    """

    __slots__ = ("_waiter", "answer", "done", "error", "events", "failed", "key")

    def __init__(self, key: str) -> None:
        self.key = key
        self.events: list[bytes] = []
        self.done = False
        self.failed = False
        self.answer: bytes | None = None
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def push(self, payload: bytes) -> None:
        """Add one event of the leader's stream (and wake whoever follows)."""
        self.events.append(payload)
        self._wake()

    def end(self, answer: bytes | None, *, failed: bool, error: Exception | None = None) -> bool:
        """Finish; returns False if already finished (every later call is a no-op)."""
        if self.done:
            return False
        self.done, self.answer, self.failed, self.error = True, answer, failed, error
        self._wake()
        return True

    async def changed(self, timeout_s: float) -> bool:
        """Wait until an event is pushed or the flight ends; False on timeout."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._waiter), timeout_s)
        except TimeoutError:
            return False
        return True

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class SingleFlight:
    """In-flight calls by key. The first caller of ``join`` leads and must ``finish``;
    every later caller of the same key follows the leader's ``Flight``."""

    def __init__(self) -> None:
        self._calls: dict[str, Flight] = {}

    def join(self, key: str) -> tuple[Flight, bool]:
        """The flight for ``key``, and whether the caller is its leader."""
        running = self._calls.get(key)
        if running is not None:
            return running, False
        flight = self._calls[key] = Flight(key)
        return flight, True

    def finish(
        self,
        flight: Flight,
        answer: bytes | None,
        *,
        failed: bool | None = None,
        error: Exception | None = None,
    ) -> None:
        """End ``flight`` (``failed`` defaults to having no answer); idempotent, and never
        touches a newer flight of the same key."""
        flight.end(answer, failed=answer is None if failed is None else failed, error=error)
        if self._calls.get(flight.key) is flight:
            del self._calls[flight.key]

    def __len__(self) -> int:
        return len(self._calls)
