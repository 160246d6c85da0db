"""One in-flight computation per key, shared by every caller that asks for it."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Concurrent `run(key, ...)` calls share one task; the first caller's factory runs.

    Callers await the task through `asyncio.shield`, so a caller that goes away (an HTTP
    client hanging up cancels its handler) does not cancel the work for the others, and the
    work finishes and is stored even when nobody waits any more. A failed task is dropped,
    so the next request tries again.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[T]] = {}

    def in_flight(self, key: str) -> bool:
        return key in self._tasks

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task)

    def _forget(self, key: str, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters that left must not trigger a warning
