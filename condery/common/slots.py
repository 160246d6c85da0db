"""A semaphore whose waiters are served largest first.

Layer builds take one of a few CPU slots. Served in arrival order, a large package whose
download finished last waits behind every small one and then runs alone at the end, one
core busy and the other idle: the build's makespan is the large package's whole time
after everything else. Served largest first (the longest-processing-time rule), the large
ones start as soon as they are ready and the small ones fill the gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from typing import AsyncIterator


class PrioritySlots:
    """`async with slots.taken(weight)`: at most `count` holders; a freed slot goes to the
    waiter with the largest weight (ties: first come). `async with slots` is weight 0."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("at least one slot")
        self._free = count
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def taken(self, weight: float = 0) -> AsyncIterator[None]:
        await self._acquire(weight)
        try:
            yield
        finally:
            self._release()

    async def __aenter__(self) -> None:
        await self._acquire(0)

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    async def _acquire(self, weight: float) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-weight, next(self._order), waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot as it was cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to it
                return
        self._free += 1
