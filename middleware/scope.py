"""What lives exactly as long as one client request: cleanups, background work, usage.

The edge closes a request's scope once the response has been sent, or dropped: a client
that went away, a stream that was never read. Stages tie their resources to it rather than
to an async generator's ``finally``, which never runs for a generator nobody iterated.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

Cleanup = Callable[[], Awaitable[None] | None]


@dataclass(slots=True)
class Usage:
    """Tokens spent by the backend calls a request made on its own behalf."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, usage: object) -> None:
        """Add an OpenAI ``usage`` object (ignores anything that is not one)."""
        self.calls += 1
        if isinstance(usage, dict):
            self.prompt_tokens += _int(usage.get("prompt_tokens"))
            self.completion_tokens += _int(usage.get("completion_tokens"))

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


class RequestScope:
    """Cleanups and tasks of one request, closed once by the edge (or the SDK).

    Shared by a request's context and every context derived from it for sub-requests.
    ``on_fanout`` is the edge's hook, called once when a stage first starts a sub-request:
    the edge then watches for the client going away (a watcher per request would cost the
    hot path for nothing).
    """

    __slots__ = ("_cleanups", "_fanned_out", "_tasks", "closed", "on_fanout", "usage")

    def __init__(self) -> None:
        self._cleanups: list[Cleanup] | None = None
        self._tasks: set[asyncio.Task[Any]] | None = None
        self._fanned_out = False
        self.closed = False
        self.on_fanout: Callable[[], None] | None = None
        self.usage = Usage()

    @property
    def idle(self) -> bool:
        """Nothing to clean up (the common case: closing costs nothing)."""
        return not self._cleanups and not self._tasks

    def defer(self, cleanup: Cleanup) -> None:
        """Run ``cleanup`` when the request ends (last deferred, first run). A cleanup
        deferred after the scope closed runs soon, in the background."""
        if self.closed:
            asyncio.get_running_loop().create_task(_run_cleanup(cleanup))
            return
        if self._cleanups is None:
            self._cleanups = []
        self._cleanups.append(cleanup)

    def spawn(self, work: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``work`` as a task that is cancelled if still running when the request ends."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        if self.closed:
            task.cancel()
            return task
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def fanned_out(self) -> bool:
        """A stage has started a sub-request."""
        return self._fanned_out

    def fanout_started(self) -> None:
        if not self._fanned_out:
            self._fanned_out = True
            if self.on_fanout is not None:
                self.on_fanout()

    async def aclose(self) -> None:
        """Cancel the request's remaining tasks, then run its cleanups; never raises."""
        if self.closed:
            return
        self.closed = True
        tasks, self._tasks = self._tasks, None
        if tasks:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        cleanups, self._cleanups = self._cleanups, None
        for cleanup in reversed(cleanups or ()):
            await _run_cleanup(cleanup)


async def _run_cleanup(cleanup: Cleanup) -> None:
    try:
        outcome = cleanup()
        if inspect.isawaitable(outcome):
            await outcome
    except Exception:
        log.exception("a request cleanup failed")
