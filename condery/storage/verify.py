"""`condery verify`: hash every stored blob, report (and with repair, remove) corrupt ones.

A removed blob is rebuilt by the next build that needs it: the builder treats a layer
record whose blob is missing as a cache miss. Removing is safe while replicas serve
from the same store: a blob that fails its digest is of no use to anyone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from condery.storage import Store

# Blobs hashed at once: hashing is CPU and disk bound, a few in parallel keep both busy.
CONCURRENCY = 4


@dataclass
class VerifyReport:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    vanished: int = 0  # listed, then gone before it was read (another replica's repair)
    removed: int = 0


async def verify_store(
    store: Store, repair: bool = False, on_corrupt: Callable[[str], None] | None = None
) -> VerifyReport:
    """Check every blob against its digest; with `repair`, remove the corrupt ones."""
    report = VerifyReport()
    slots = asyncio.Semaphore(CONCURRENCY)

    async def check(digest: str) -> None:
        async with slots:
            try:
                good = await store.verify_blob(digest)
            except KeyError:
                report.vanished += 1
                return
            report.checked += 1
            if good:
                return
            report.corrupt.append(digest)
            if on_corrupt is not None:
                on_corrupt(digest)
            if repair:
                await store.remove_blob(digest)
                report.removed += 1

    await asyncio.gather(*[check(digest) async for digest in store.list_blobs()])
    report.corrupt.sort()
    return report
