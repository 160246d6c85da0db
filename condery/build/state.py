"""The one explicit state object: everything a request or a build needs, opened once.

Nothing in condery reads globals; the server, the CLI and the tests build an AppState
from a Config and pass it down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import rattler

from condery.build.admission import BuildQueue
from condery.build.coordination import Coordinator, LocalCoordinator, open_coordinator
from condery.build.outcomes import Outcomes
from condery.common.slots import PrioritySlots
from condery.config import Config
from condery.image.names import ImageRef
from condery.layers.archive_cache import cap_archive_cache
from condery.layers.bytecode import HostInterpreters
from condery.layers.package_layer import channel_client
from condery.layers.stream_job import build_streamed
from condery.layers.workers import LayerWorkers
from condery.observability.metrics import Metrics
from condery.storage import StorageError, Store, os_error_text
from condery.storage.backends import open_store
from condery.storage.filesystem import FilesystemStore
from condery.storage.litter import remove_stale, stale_age

log = logging.getLogger("condery")
# The S3 backend's local work directories: <system temp dir>/condery-work-<pid>-<random>.
WORK_DIR_PREFIX = "condery-work-"
STAGING_CLEAN_TIMEOUT = 20  # seconds
REPODATA_RETRIES = 3  # rattler's own retry with backoff, for passing faults of a repodata fetch


@dataclass
class AppState:
    config: Config
    store: Store
    http: aiohttp.ClientSession  # upstream registries (base images)
    gateway: rattler.Gateway  # repodata fetching and caching for the solver
    download_client: rattler.Client  # package downloads (authenticated, no retry of its own)
    work_dir: Path  # staging for layer builds; on the store's filesystem when it has one
    builds: BuildQueue[ImageRef]  # image builds: running, queued, per client
    # What became of builds: definitive solve failures, recent failures, build statuses.
    outcomes: Outcomes
    cpu_slots: PrioritySlots  # package layer builds at once (two per layer worker), the largest package first
    layer_workers: LayerWorkers  # the processes streamed package layers are written in
    download_slots: asyncio.Semaphore  # concurrent package downloads (network-bound)
    owns_work_dir: bool = False  # a private temporary directory, removed on close
    metrics: Metrics = field(default_factory=Metrics)  # this app's own registry (/metrics)
    # Cold builds across replicas on one bucket (a Redis lock per image key), or nothing.
    coordinator: Coordinator = field(default_factory=LocalCoordinator)
    # Host interpreters that compile python bytecode into layers, found once per version.
    interpreters: HostInterpreters = field(default_factory=HostInterpreters)

    def __post_init__(self) -> None:
        self.metrics.watch_builds(lambda: self.builds.running, lambda: self.builds.queued)
        if isinstance(self.coordinator, LocalCoordinator):  # opened here: its events go to these metrics
            self.coordinator = open_coordinator(
                self.config.coordination, lambda event: self.metrics.build_locks.labels(event).inc()
            )

    @classmethod
    async def open(cls, config: Config) -> "AppState":
        store = open_store(config.storage)
        max_age = stale_age(config.build_timeout)
        if isinstance(store, FilesystemStore):
            work_dir = store.staging_dir()
        else:
            await asyncio.to_thread(_remove_orphan_work_dirs)
            work_dir = Path(tempfile.mkdtemp(prefix=f"{WORK_DIR_PREFIX}{os.getpid()}-"))
        config.package_cache_dir.mkdir(parents=True, exist_ok=True)
        workers = config.layer_workers or os.cpu_count() or 2
        await _clean_litter(store, config.package_cache_dir, max_age)
        state = cls(
            config=config,
            store=store,
            # Both clients read channel credentials from rattler's auth file (RATTLER_AUTH_FILE),
            # made first: an unreadable file stops the start before the HTTP session opens.
            gateway=rattler.Gateway(cache_dir=config.package_cache_dir.parent / "repodata",
                                    client=channel_client(max_retries=REPODATA_RETRIES)),
            download_client=channel_client(),
            http=aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
                headers={"User-Agent": "condery"},
            ),
            work_dir=work_dir,
            builds=BuildQueue(
                running=config.max_concurrent_builds,
                queued=config.max_queued_builds,
                per_client=config.max_builds_per_client,
            ),
            outcomes=Outcomes(config.failed_solve_ttl),
            # Two packages a worker: one being written, one waiting in the pool's queue, so a
            # worker never idles while the event loop hands it the next package (measured:
            # 300 packages of 10 KB 1.93 s against 2.0-2.2 s with one a worker).
            cpu_slots=PrioritySlots(2 * workers),
            # Started on the first layer (or by `condery serve` at start), not here: a CLI
            # command or a test that builds nothing starts no process.
            layer_workers=LayerWorkers(workers, preload=(build_streamed.__module__,)),
            download_slots=asyncio.Semaphore(config.max_concurrent_downloads),
            owns_work_dir=not isinstance(store, FilesystemStore),
        )
        await state.cap_package_cache()
        return state

    async def cap_package_cache(self) -> None:
        """Keep the local archive cache under package_cache_max_size (at start, after builds)."""
        try:
            await asyncio.to_thread(cap_archive_cache, self.config.package_cache_dir,
                                    self.config.package_cache_max_size)
        except OSError as exc:  # a cache we cannot trim is no reason to fail a build
            log.warning("cannot trim the package cache: %s", os_error_text(exc))

    async def close(self) -> None:
        await self.layer_workers.close()
        await self.coordinator.close()
        await self.http.close()
        await self.store.close()
        if self.owns_work_dir:
            await asyncio.to_thread(shutil.rmtree, self.work_dir, True)


def _remove_orphan_work_dirs() -> None:
    """Remove the work directories of condery processes that are gone (killed).

    Each directory is named after its process id, so a live process's directory is
    never touched however long it has been idle; a directory whose process is gone is
    removed whatever its age.
    """
    for entry in Path(tempfile.gettempdir()).glob(WORK_DIR_PREFIX + "*"):
        pid_text = entry.name[len(WORK_DIR_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed the work directory of a stopped condery process (pid %s)", pid_text)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


async def _clean_litter(store: Store, package_cache_dir: Path, max_age: float) -> None:
    """Remove what killed processes left in the store's staging and the package cache.

    Best effort: a store that cannot be reached now is reported by the requests that
    need it (and /readyz), not by refusing to start.
    """
    try:
        # Bounded: an unreachable S3 endpoint must not hold up the start for minutes.
        staged = await asyncio.wait_for(store.clean_staging(max_age), STAGING_CLEAN_TIMEOUT)
    except (StorageError, asyncio.TimeoutError) as exc:
        log.warning("cannot clean the store's staging area: %s", exc)
        staged = 0
    downloads = await asyncio.to_thread(remove_stale, package_cache_dir, max_age, "archives/*/.download-*")
    if staged or downloads:
        log.info("removed crash litter: %d staging entries, %d partial downloads", staged, downloads)
