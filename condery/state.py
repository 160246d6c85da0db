"""The one explicit state object: everything a request or a build needs, opened once.

Nothing in condery reads globals; the server, the CLI and the tests build an AppState
from a Config and pass it down.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import rattler

from condery.admission import BuildQueue, RecentFailures
from condery.config import Config
from condery.registry.names import ImageRef
from condery.storage import Store, open_store
from condery.storage.filesystem import FilesystemStore


@dataclass
class AppState:
    config: Config
    store: Store
    http: aiohttp.ClientSession  # upstream registries (base images)
    gateway: rattler.Gateway  # repodata fetching and caching for the solver
    work_dir: Path  # staging for layer builds; on the store's filesystem when it has one
    builds: BuildQueue[ImageRef]  # image builds: running, queued, per client
    failed_solves: RecentFailures  # names that recently failed to solve, by image key
    cpu_slots: asyncio.Semaphore  # concurrent package layer builds (CPU-bound)

    @classmethod
    async def open(cls, config: Config) -> "AppState":
        store = open_store(config.storage)
        if isinstance(store, FilesystemStore):
            work_dir = store.staging_dir()
        else:
            work_dir = Path(tempfile.mkdtemp(prefix="condery-work-"))
        config.package_cache_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            config=config,
            store=store,
            http=aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
                headers={"User-Agent": "condery"},
            ),
            gateway=rattler.Gateway(cache_dir=config.package_cache_dir.parent / "repodata"),
            work_dir=work_dir,
            builds=BuildQueue(
                running=config.max_concurrent_builds,
                queued=config.max_queued_builds,
                per_client=config.max_builds_per_client,
            ),
            failed_solves=RecentFailures(config.failed_solve_ttl),
            cpu_slots=asyncio.Semaphore(os.cpu_count() or 2),
        )

    async def close(self) -> None:
        await self.http.close()
        await self.store.close()
