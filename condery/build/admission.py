"""Who may start an image build, and when: the build queue.

A cold pull costs a solve and possibly many layer builds, while asking costs one HTTP
request; without limits a few clients asking for many distinct names starve everyone.
So image builds go through a `BuildQueue` (bounded in total and per client, with
queued builds dropped when nobody waits for them); definitive solve failures are
remembered for a short time in outcomes.py. Warm pulls never come here.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, TypeVar

from condery.common.singleflight import SingleFlight
from condery.oci import errors

T = TypeVar("T")


class BuildQueue(Generic[T]):
    """Single-flight image builds, at most `running` at once and `queued` waiting.

    A request for a key already in flight joins it whatever the limits (it costs
    nothing). A new key is refused with 429 TOOMANYREQUESTS when `running + queued`
    builds are already in flight, or when its client already started `per_client` of
    them. A build that has not got a slot yet is cancelled when its last waiter leaves;
    once it holds a slot it is pinned and finishes for the layer cache and later pulls.
    """

    def __init__(self, *, running: int, queued: int, per_client: int) -> None:
        self.max_running = running
        self.max_queued = queued
        self.max_per_client = per_client
        self._slots = asyncio.Semaphore(running)
        self._flights: SingleFlight[T] = SingleFlight(cancel_abandoned=True)
        self._owners: dict[str, str] = {}  # key -> the client whose request started it

    # -- what tests and the landing page may look at ----------------------------
    @property
    def running(self) -> int:
        return self._flights.pinned

    @property
    def queued(self) -> int:
        return len(self._flights) - self._flights.pinned

    @property
    def waiting(self) -> int:
        """Requests waiting on builds in flight, joins included."""
        return self._flights.waiting

    def in_flight(self, key: str) -> bool:
        return self._flights.in_flight(key)

    def builds_of(self, client: str) -> int:
        """Builds in flight (running or queued) that `client`'s requests started."""
        return sum(1 for key, owner in self._owners.items() if owner == client and self._flights.in_flight(key))

    # -- admission --------------------------------------------------------------
    async def run(self, key: str, client: str, work: Callable[[], Awaitable[T]]) -> T:
        if not self._flights.in_flight(key):
            self._admit(client)
            self._owners[key] = client
        return await self._flights.run(key, lambda: self._started(key, work))

    def _admit(self, client: str) -> None:
        # Forget owners of finished builds first, so the table stays as small as the queue.
        for key in [k for k in self._owners if not self._flights.in_flight(k)]:
            del self._owners[key]
        if len(self._flights) >= self.max_running + self.max_queued:
            raise errors.TooManyRequests(
                f"the build queue is full ({self.max_running} building, {self.max_queued} waiting); "
                "images already built are still served, retry this one later"
            )
        if self.builds_of(client) >= self.max_per_client:
            raise errors.TooManyRequests(
                f"this client already has {self.max_per_client} image builds running or waiting; "
                "retry when one has finished"
            )

    async def _started(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        async with self._slots:
            self._flights.pin(key)
            return await work()
