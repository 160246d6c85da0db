"""One in-flight computation per key, shared by every caller that asks for it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Flight(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0
    pinned: bool = False  # finish even when nobody waits any more


class SingleFlight(Generic[T]):
    """Concurrent `run(key, ...)` calls share one task; the first caller's factory runs.

    Callers await the task through `asyncio.shield`, so a caller that goes away (an HTTP
    client hanging up, a build that timed out) never cancels the work for the others.
    What happens once the *last* caller has gone depends on `cancel_abandoned`:

    - False: the work finishes and is stored even when nobody waits any more.
    - True: the work is cancelled, unless it was `pin`ned. Image builds pin themselves
      once they hold a build slot (the layer cache and later pulls profit from a started
      build), so only queued builds are dropped; layer builds are never pinned, so the
      layers of an image build that timed out stop with it unless another build needs them.

    A failed or cancelled task is dropped, so the next request tries again.
    """

    def __init__(self, *, cancel_abandoned: bool = False) -> None:
        self.cancel_abandoned = cancel_abandoned
        self._flights: dict[str, _Flight[T]] = {}

    def in_flight(self, key: str) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    @property
    def pinned(self) -> int:
        """How many flights are pinned (for image builds: started, holding a slot)."""
        return sum(1 for flight in self._flights.values() if flight.pinned)

    @property
    def waiting(self) -> int:
        """How many callers wait on all flights together (for tests: a join has arrived)."""
        return sum(flight.waiters for flight in self._flights.values())

    def pin(self, key: str) -> None:
        """Let the flight of `key` finish even if every caller leaves."""
        self._flights[key].pinned = True

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(asyncio.ensure_future(factory()))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda done: self._forget(key, done))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and self.cancel_abandoned and not flight.pinned and not flight.task.done():
                # Forget it now rather than in the done callback: a caller arriving before
                # the cancellation completes must start afresh, not join a cancelled task.
                self._forget(key, flight.task)
                flight.task.cancel()

    def _forget(self, key: str, task: asyncio.Task[T]) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight.task is task:
            del self._flights[key]
        if task.done() and not task.cancelled():
            task.exception()  # mark retrieved: waiters that left must not trigger a warning
