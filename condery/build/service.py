"""From an image request to stored manifests: the pipeline, read top to bottom.

    ImageRequest + tag
      -> base image per platform (registry/base_image), part of the cache key
      -> cache lookup (cache.py): fresh -> served; expired -> served, refreshed in the
         background; missing -> built now, through the build queue
      -> solve per platform (layers/solve), against repodata no older than the TTL
      -> one layer per package, grouped under the budget, the environment layer
         (image_layers.py)
      -> config + manifests (+ index) (assembly.py, registry/manifest: pure)
      -> store, then the image record that makes it visible

Records are written after the blobs they point to, so a crash at any point leaves
orphan blobs at worst, and the next request finishes the job. Every failure leaves here
as one of the registry's errors: MANIFEST_UNKNOWN (404) for a definitive "no" (the
solver cannot satisfy the name on any platform, a package is refused), UNAVAILABLE (503)
for a passing fault (a channel, the base, the store, a timeout), TOOMANYREQUESTS (429)
from the build queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping, Protocol, Sequence

import rattler

from condery.build.admission import BuildQueue
from condery.build.assembly import (
    PlatformImage, created_of, image_account, image_settings, layer_annotations, manifest_annotations,
)
from condery.records.freshness import Freshness, RepodataClock
from condery.records.keys import ImageKeys
from condery.records.schemas import ImageRecord, LayerEntry
from condery.records import kinds
from condery.records.cache import RecordCache
from condery.image.tags import tag_of
from condery.image.meta import MetaPackage
from condery.build.image_layers import LayerBuilder
from condery.layers import PackageError, PackageUnavailable
from condery.layers.bytecode import BytecodePlan, plan_bytecode, wants_bytecode
from condery.layers.compression import GZIP, ZSTD
from condery.layers.env_layer import explicit_lock
from condery.layers.package_layer import python_site_packages
from condery.layers.solve import SolveError, SolveRequest, SolveUnavailable, SpecError, solve
from condery.build.look import ImageLook, SolveCache, Solved, SolvedPlatform, built_layers, solved_platform
from condery.build.outcomes import Outcomes
from condery.build.progress import BuildStatus, build_id
from condery.observability.build_report import BuildReport
from condery.observability.logs import event
from condery.oci import errors
from condery.records.schemas import BaseImage
from condery.bases.errors import BaseImageError
from condery.bases.resolve import resolve_base_image
from condery.bases.auth import RegistryAuth
from condery.oci.manifest import (
    Descriptor,
    docker_manifest,
    docker_manifest_list,
    image_config,
    oci_index,
    oci_manifest,
    sha256_digest,
)
from condery.oci.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)
from condery.image.names import ImageRef, ImageRequest
from condery.oci.platforms import OciPlatform, oci_platform
from condery.image.tags import Latest, Snapshot
from condery.common.singleflight import SingleFlight
from condery.build.state import AppState
from condery.storage import StorageError, store_fault_reason

log = logging.getLogger("condery.build")

# Background refreshes enter the build queue as this client, so that together they hold
# at most max_builds_per_client slots and cold builds keep the rest.
REFRESH_CLIENT = "background-refresh"
BASE_RECHECK = 30  # seconds a resolved base image is used before it is resolved again


class BuildProgress(Protocol):
    """What a build reports as it goes (the CLI draws a progress bar from it, the builds
    API keeps a condery.progress.BuildStatus). Sizes are the packages' sizes in repodata."""

    def solving(self, platform: str) -> None: ...

    def solved(self, platform: str, packages: int, size: int) -> None: ...

    def layer_done(self, platform: str, package: str, built: bool, size: int) -> None: ...

    def assembling(self, platform: str) -> None: ...


@dataclass(frozen=True)
class Unsolvable:
    """A platform the solver cannot satisfy: left out of the image while others solve."""

    subdir: str
    reason: str


@dataclass(frozen=True)
class Built:
    ref: ImageRef
    images: list[PlatformImage]
    data_as_of: float
    skipped: Mapping[str, str] = field(default_factory=dict)


class ImageService:
    """Answers the registry's questions about images, building them when needed."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.config = state.config
        self.store = state.store
        # Image builds are single-flight inside the queue; its counts are for tests and
        # the landing page.
        self.builds: BuildQueue[ImageRef] = state.builds
        self.records = RecordCache(state.store)
        self.layers = LayerBuilder(state, self.records)
        self.freshness = Freshness(self.config.latest_ttl, self.config.snapshot_grace)
        self.repodata = RepodataClock(state.gateway, self.config.latest_ttl)
        self._bases: SingleFlight[BaseImage] = SingleFlight()
        self._refreshes: dict[str, asyncio.Task[None]] = {}
        self._prebuilds: set[asyncio.Task[ImageRef]] = set()  # held here: the loop keeps weak references
        self.keys = ImageKeys(self.config)
        self._last_bases: dict[str, BaseImage] = {}
        self._bases_checked_at = 0.0  # time.monotonic() of the last successful resolution
        self._bases_generation = -1  # the store's removal_generation at that resolution
        self.solves = SolveCache(self.freshness, self.config.max_concurrent_builds)  # look(): solves, no builds

    @property
    def meta_packages(self) -> Mapping[str, MetaPackage]:
        return self.config.meta_packages

    @property
    def outcomes(self) -> Outcomes:
        """What became of builds: failures for the landing page, statuses for the builds API."""
        return self.state.outcomes

    # -- the registry's protocol ------------------------------------------------
    async def resolve(self, request: ImageRequest, reference: Latest | Snapshot, client: str = "local") -> ImageRef:
        """The image for a name and tag; `client` (the peer address) is who pays for a cold build."""
        key, bases, record = await self._image_of(request, reference)
        if record is not None:
            if not self.freshness.is_fresh(record, reference):
                # stale-while-revalidate: a warm pull never waits for a re-solve.
                self._refresh(key, request, reference, bases)
            try:
                await self.records.note_served(key, record)
            except StorageError as exc:  # bookkeeping for gc: never worth failing a pull
                log.warning("cannot note %s as served: %s", key, exc)
            return record.ref
        failure = self.state.outcomes.unsolvable(key)
        if failure is not None:
            raise errors.ManifestUnknown(failure)
        if not self.builds.in_flight(key):
            # Another replica building it: wait for its record like a join, without a queue slot.
            ref = await self.state.coordinator.wait_elsewhere(key, lambda: self._recorded(key),
                                                              self.config.build_timeout)
            if ref is not None:
                return ref
        return await self._cold_build(key, request, reference, bases, client)

    async def _recorded(self, key: str) -> ImageRef | None:
        """The image's ref once built (by any replica); a store fault reads as not yet,
        so that the build of our own that follows reports it as a pull would."""
        try:
            record = await self.records.image(key, quiet=True)  # polled while another replica builds
        except StorageError:
            return None
        return None if record is None else record.ref

    async def _image_of(
        self, request: ImageRequest, reference: Latest | Snapshot
    ) -> tuple[str, dict[str, BaseImage], ImageRecord | None]:
        """The image's record key, the bases it is built on, and its record if built."""
        tag = tag_of(reference)
        if isinstance(reference, Snapshot) and reference.exclude_newer > datetime.now(timezone.utc):
            raise errors.ManifestUnknown(f"snapshot {tag} has not ended yet (UTC); use :latest or a past day")
        bases = await self._bases_for_platforms()
        key = self.keys.key(request, tag, bases)
        try:
            return key, bases, await self.records.image(key)
        except StorageError as exc:
            raise _store_failed(request, exc) from None

    async def _cold_build(
        self, key: str, request: ImageRequest, reference: Latest | Snapshot, bases: Mapping[str, BaseImage],
        client: str, on_status: Callable[[BuildStatus], None] | None = None,
    ) -> ImageRef:
        """The build of a missing image through the queue, joined when in flight, with a
        status the builds API shows (queued until it holds a slot).

        No await before `builds.run` admits or joins: the status found or started here
        is the one of the flight that runs.
        """
        tracker = self.state.outcomes.builds
        if self.builds.in_flight(key):
            # Untracked only for a flight not started here (a refresh whose record went meanwhile).
            status = tracker.of(key) or BuildStatus(build_id(key), request.canonical_name, tag_of(reference))
        else:
            status = tracker.start(key, request.canonical_name, tag_of(reference))
        if on_status is not None:
            on_status(status)
        try:
            return await self.builds.run(key, client, lambda: self._tracked(status, key, request, reference, bases))
        except (errors.TooManyRequests, asyncio.CancelledError):
            if status.state == "queued" and not self.builds.in_flight(key):
                tracker.discard(status)  # refused, or dropped before it started
            raise

    async def _tracked(
        self, status: BuildStatus, key: str, request: ImageRequest, reference: Latest | Snapshot,
        bases: Mapping[str, BaseImage],
    ) -> ImageRef:
        # Inside the single flight: the outcome is written once, whoever waits for it.
        status.started()
        try:
            # Under the key's cross-replica lock; another replica's result when it built it first.
            ref = await self.state.coordinator.exclusive(
                key, lambda: self._build_and_record(key, request, reference, bases, status),
                lambda: self._recorded(key), self.config.build_timeout,
            )
        except errors.RegistryError as exc:
            status.failed(exc.code, exc.message)
            raise
        except BaseException:  # cancelled (shutdown) or a bug, answered as a 500 by the server
            status.failed("UNKNOWN", "the build stopped on an internal error")
            raise
        status.finished(ref.oci_digest)
        return ref

    async def prebuild(
        self, request: ImageRequest, reference: Latest | Snapshot, client: str
    ) -> tuple[BuildStatus, bool]:
        """Start the build a pull of this name and tag would start, without waiting for it.

        Returns its status and whether it was already built (no build started; an expired
        one is refreshed in the background, as a pull would). Raises
        what a pull would raise before building: TOOMANYREQUESTS when the queue refuses
        it, MANIFEST_UNKNOWN for a name that recently failed to solve.
        """
        key, bases, record = await self._image_of(request, reference)
        if record is not None:
            if not self.freshness.is_fresh(record, reference):
                self._refresh(key, request, reference, bases)  # as a pull would: in the background
            known = self.state.outcomes.builds.of(key)
            if known is not None and known.state == "done":
                return known, True
            done = BuildStatus(build_id(key), request.canonical_name, tag_of(reference))
            done.finished(record.ref.oci_digest)
            return done, True  # not tracked: no build happened, there is nothing to follow
        failure = self.state.outcomes.unsolvable(key)
        if failure is not None:
            raise errors.ManifestUnknown(failure)
        # The prebuild waits for its build like a pull does (so a queued build is not
        # dropped as abandoned), in a task of its own. Admission happens in the task's
        # first step, before it first suspends: one turn of the loop tells whether the
        # queue refused it.
        statuses: list[BuildStatus] = []
        task = asyncio.ensure_future(self._cold_build(key, request, reference, bases, client, statuses.append))
        await asyncio.sleep(0)
        if task.done():
            task.result()  # raises TOOMANYREQUESTS
        self._prebuilds.add(task)
        task.add_done_callback(self._prebuild_done)
        return statuses[0], False

    def _prebuild_done(self, task: asyncio.Task[ImageRef]) -> None:
        self._prebuilds.discard(task)
        if not task.cancelled():
            task.exception()  # the outcome is in the build's status; nobody else reads it

    async def manifest_media_type(self, digest: str) -> str | None:
        record = await self.store.get_record(kinds.MANIFEST_TYPES, kinds.digest_key(digest))
        return None if record is None else record["media_type"]

    async def tags(self, request: ImageRequest) -> list[str]:
        return sorted(await self.records.tags(request) | {"latest"})

    # -- refresh off the request path ------------------------------------------------
    def _refresh(self, key: str, request: ImageRequest, reference: Latest | Snapshot, bases: Mapping[str, BaseImage]) -> None:
        if key in self._refreshes:
            return  # single flight: one refresh per image at a time

        async def run() -> None:
            try:
                await self.builds.run(key, REFRESH_CLIENT, lambda: self._build_and_record(key, request, reference, bases))
                log.info("refresh key=%s done", key)
            except errors.RegistryError as exc:
                # stale-if-error: the last good image stays in service until a refresh succeeds.
                log.warning("refresh key=%s failed (%s), serving the last good image: %s", key, exc.code, exc.message)
            except Exception:  # noqa: BLE001 - a background task has nobody to raise to
                log.exception("refresh key=%s failed, serving the last good image", key)

        log.info("refresh key=%s started (expired)", key)
        task = asyncio.ensure_future(run())
        self._refreshes[key] = task
        task.add_done_callback(lambda _: self._refreshes.pop(key, None))

    async def refreshes_settled(self) -> None:
        """Wait for the background refreshes running now (tests, and a clean shutdown)."""
        while self._refreshes:
            await asyncio.gather(*self._refreshes.values(), return_exceptions=True)

    # -- building -------------------------------------------------------------------
    async def build(
        self,
        request: ImageRequest,
        reference: Latest | Snapshot,
        progress: BuildProgress | None = None,
    ) -> tuple[ImageRef, list[PlatformImage]]:
        """Build (or reuse the layers of) the image and store its top-level manifests (the CLI's entry)."""
        bases = await self._bases_for_platforms()
        built = await self._build(self.keys.key(request, tag_of(reference), bases), request, reference, bases, progress)
        return built.ref, built.images

    async def _build_and_record(
        self, key: str, request: ImageRequest, reference: Latest | Snapshot, bases: Mapping[str, BaseImage],
        progress: BuildProgress | None = None,
    ) -> ImageRef:
        try:
            built = await self._build(key, request, reference, bases, progress)
        except errors.RegistryError as exc:
            self.state.outcomes.failed(request.canonical_name, tag_of(reference), exc)
            raise
        record = ImageRecord(
            ref=built.ref,
            data_as_of=built.data_as_of,
            platforms={
                f"{i.platform.os}/{i.platform.architecture}": {
                    "oci": i.oci.digest,
                    "docker": i.docker.digest,
                    "lock_sha256": hashlib.sha256(i.lock.encode()).hexdigest(),
                }
                for i in built.images
            },
            skipped=built.skipped,
        )
        await self.records.put_image(key, record)
        return built.ref

    async def _build(
        self,
        key: str,
        request: ImageRequest,
        reference: Latest | Snapshot,
        bases: Mapping[str, BaseImage],
        progress: BuildProgress | None,
    ) -> Built:
        """`_build_image`, with its start and end logged and its metrics counted."""
        report = BuildReport.start(request.canonical_name, tag_of(reference), self.config.platforms,
                                   self.state.metrics)
        try:
            built = await self._build_image(key, request, reference, bases, progress, report)
        except errors.RegistryError as exc:
            report.finish(f"{exc.code}: {exc.message}")
            raise
        except asyncio.CancelledError:
            report.finish("cancelled")
            raise
        except Exception as exc:
            report.finish(f"internal error ({type(exc).__name__})")
            raise
        finally:
            await self.state.cap_package_cache()
        report.finish(skipped=built.skipped)
        return built

    async def _build_image(
        self,
        key: str,
        request: ImageRequest,
        reference: Latest | Snapshot,
        bases: Mapping[str, BaseImage],
        progress: BuildProgress | None,
        report: BuildReport,
    ) -> Built:
        """Every platform's image and the top-level manifests, or a registry error.

        The caller bounds concurrency (the server's BuildQueue; the CLI builds one image).
        At `build_timeout` the work is cancelled, not only abandoned: the platforms' tasks,
        and with them every layer build no other image build waits for. What cannot be
        interrupted is code already running in a thread (a solve inside rattler, a layer's
        unpack/tar/gzip): its result is dropped when it ends. That is bounded by rattler's
        own solve timeout, by the package size limits, and by the default thread pool
        (at most cpu count + 4 such threads at once, whatever was cancelled).
        """
        name = request.canonical_name
        # A date is solved against repodata read now: one asked for the first time must not
        # be answered from data loaded before packages of that day were uploaded.
        data_as_of = self.repodata.refresh(self.config.channels, force=isinstance(reference, Snapshot))
        try:
            results = await asyncio.wait_for(
                _all_or_nothing(
                    [self._build_platform(request, reference, subdir, bases[subdir], progress, report)
                     for subdir in self.config.platforms]
                ),
                timeout=self.config.build_timeout,
            )
        except SpecError as exc:
            raise errors.NameInvalid(str(exc)) from None
        except SolveUnavailable as exc:  # a passing fault (channel, timeout): not remembered
            raise errors.Unavailable(f"cannot solve {name}: {exc}") from None
        except PackageUnavailable as exc:
            raise errors.Unavailable(f"cannot build {name}: {exc}") from None
        except PackageError as exc:
            if (reason := store_fault_reason(exc)) is not None:  # a full disk, not a bad package
                raise errors.Unavailable(f"cannot build {name}: {reason}") from None
            raise errors.ManifestUnknown(f"cannot build {name}: {exc}") from None
        except asyncio.TimeoutError:  # before OSError: it is one
            raise errors.Unavailable(f"building took longer than {self.config.build_timeout} s") from None
        except StorageError as exc:
            raise _store_failed(request, exc) from None
        except OSError as exc:  # the work directory's disk (ENOSPC, EIO, ...); its message names paths
            if (reason := store_fault_reason(exc)) is None:
                raise
            raise errors.Unavailable(f"cannot build {name}: {reason}") from None
        images = [r for r in results if isinstance(r, PlatformImage)]
        skipped = {r.subdir: r.reason for r in results if isinstance(r, Unsolvable)}
        if not images:
            raise self._unsolvable(key, name, skipped)
        for subdir, reason in skipped.items():
            log.warning("%s: served without %s, which does not solve: %s", name, subdir, reason)
        started = time.monotonic()
        ref = await self._top_level(request, images)
        report.span("manifests", started)
        return Built(ref, images, data_as_of, skipped)

    def _unsolvable(self, key: str, name: str, skipped: Mapping[str, str]) -> errors.ManifestUnknown:
        if len(skipped) == 1:
            ((subdir, reason),) = skipped.items()
            message = f"cannot solve {name} for {subdir}: {reason}"
        else:
            message = f"cannot solve {name} for any platform: " + "; ".join(
                f"{subdir}: {reason}" for subdir, reason in skipped.items()
            )
        # A definitive answer: repeating the name must not cost another solve for a while.
        self.state.outcomes.remember_unsolvable(key, message)
        return errors.ManifestUnknown(message)

    # -- looking without building (the images API, the image pages) -----------------
    async def look(self, request: ImageRequest, reference: Latest | Snapshot) -> ImageLook:
        """What the name solves to now (cached like a pull) and, once built, what a pull gets."""
        tag = tag_of(reference)
        key, bases, record = await self._image_of(request, reference)
        try:
            failure = self.state.outcomes.unsolvable(key)
            if failure is not None:
                raise errors.ManifestUnknown(failure)
            solved = await self.solves.solve(key, reference, lambda: self._solve_platforms(key, request, reference, bases))
            layers = None if record is None else await built_layers(self.store, record)
        except StorageError as exc:
            raise _store_failed(request, exc) from None
        except errors.RegistryError as exc:
            self.state.outcomes.failed(request.canonical_name, tag, exc)
            raise
        return ImageLook(request.canonical_name, tag, solved, None if record is None else record.ref.oci_digest, layers)

    async def _solve_platforms(
        self, key: str, request: ImageRequest, reference: Latest | Snapshot, bases: Mapping[str, BaseImage]
    ) -> Solved:
        name = request.canonical_name
        data_as_of = self.repodata.refresh(self.config.channels, force=isinstance(reference, Snapshot))

        async def one(subdir: str) -> SolvedPlatform | Unsolvable:
            try:
                return solved_platform(await self._solve(request, reference, subdir, bases[subdir]), subdir)
            except SolveUnavailable:
                raise
            except SolveError as exc:
                return Unsolvable(subdir, str(exc))

        try:
            results = await _all_or_nothing([one(subdir) for subdir in self.config.platforms])
        except SpecError as exc:
            raise errors.NameInvalid(str(exc)) from None
        except SolveUnavailable as exc:
            raise errors.Unavailable(f"cannot solve {name}: {exc}") from None
        except PackageError as exc:  # a record without sha256 cannot be locked, nor built
            raise errors.ManifestUnknown(f"cannot solve {name}: {exc}") from None
        skipped = {r.subdir: r.reason for r in results if isinstance(r, Unsolvable)}
        platforms = {s: r for s, r in zip(self.config.platforms, results) if not isinstance(r, Unsolvable)}
        if not platforms:
            raise self._unsolvable(key, name, skipped)
        return Solved(data_as_of, platforms, skipped)

    async def solve(self, request: ImageRequest, reference: Latest | Snapshot, subdir: str) -> list[rattler.RepoDataRecord]:
        """The records of one platform's solve (`condery solve`)."""
        self.repodata.refresh(self.config.channels, force=isinstance(reference, Snapshot))
        try:
            base = await self._base(subdir)
        except BaseImageError as exc:
            raise errors.Unavailable(str(exc)) from None
        return await self._solve(request, reference, subdir, base)

    async def _bases_for_platforms(self) -> dict[str, BaseImage]:
        """Each platform's base as resolved now: part of the image's cache key.

        Resolved again at most every BASE_RECHECK seconds: reading it costs more than
        the rest of a warm pull, and a base changes rarely (a layout rewritten in place,
        a configuration change, which restarts the process anyway). When the base cannot
        be resolved (its registry or layout broken) after this process resolved it once,
        the last good one stands in (stale-if-error): images built on it are still
        served, and builds use it, until the base is back.
        """
        # A shorter base_image_refresh is honoured: a moved tag shows within it. A blob
        # removed since (found truncated or corrupt) may be one of the bases': they are
        # resolved again, which imports a base whose layer went, before anything is
        # built on it.
        recheck = min(BASE_RECHECK, self.config.base_image_refresh)
        if (self._last_bases and time.monotonic() - self._bases_checked_at < recheck
                and self._bases_generation == self.store.removal_generation):
            return dict(self._last_bases)
        generation = self.store.removal_generation
        try:
            bases = dict(zip(self.config.platforms, await asyncio.gather(
                *(self._base(subdir) for subdir in self.config.platforms)
            )))
        except (BaseImageError, StorageError) as exc:  # the base's registry, layout, or the store it goes to
            if set(self._last_bases) != set(self.config.platforms):
                if isinstance(exc, StorageError):
                    raise errors.Unavailable(
                        f"the base image cannot be stored: {store_fault_reason(exc) or 'the store failed'}"
                    ) from None
                raise errors.Unavailable(str(exc)) from None
            log.warning("using the last good base image: %s", exc)
            return dict(self._last_bases)
        self._last_bases, self._bases_checked_at, self._bases_generation = bases, time.monotonic(), generation
        return bases

    def recheck_bases(self) -> None:
        """Resolve the bases again on the next pull, however recently they were."""
        self._bases_checked_at = -BASE_RECHECK

    async def _base(self, subdir: str) -> BaseImage:
        """The base image for a platform, fetched once however many builds need it."""
        platform = oci_platform(subdir)
        return await self._bases.run(
            subdir,
            lambda: resolve_base_image(
                self.config.base_image, platform, self.store, self.state.http, layer_budget=self.config.layer_budget,
                auth=RegistryAuth.from_setting(self.config.base_image_auth_file),
                refresh=self.config.base_image_refresh,
            ),
        )

    async def _solve(
        self, request: ImageRequest, reference: Latest | Snapshot, subdir: str, base: BaseImage
    ) -> list[rattler.RepoDataRecord]:
        records = await solve(
            SolveRequest(
                specs=request.specs,
                platform=subdir,
                glibc=base.glibc_version,
                exclude_newer=reference.exclude_newer if isinstance(reference, Snapshot) else None,
            ),
            self.config.channels,
            self.state.gateway,
            timeout=self.config.solve_timeout,
        )
        if len(records) > self.config.max_packages:
            raise SolveError(
                f"the environment has {len(records)} packages; this registry allows {self.config.max_packages}"
            )
        return records

    async def _build_platform(
        self,
        request: ImageRequest,
        reference: Latest | Snapshot,
        subdir: str,
        base: BaseImage,
        progress: BuildProgress | None,
        report: BuildReport,
    ) -> PlatformImage | Unsolvable:
        platform = oci_platform(subdir)
        if progress:
            progress.solving(subdir)
        started = time.monotonic()
        try:
            records = await self._solve(request, reference, subdir, base)
        except SolveUnavailable:
            raise  # a passing fault fails the whole image: a partial one would be cached
        except SolveError as exc:
            return Unsolvable(subdir, str(exc))
        finally:
            report.span("solve", started)
        report.solved(len(records), started)
        if progress:
            progress.solved(subdir, len(records), sum(r.size or 0 for r in records))
        python = next((r for r in records if r.name.normalized == "python"), None)
        site_packages = python_site_packages(python)
        bytecode = await self._bytecode_plan(request, records, python, site_packages)

        async def one(record: rattler.RepoDataRecord) -> LayerEntry:
            entry, built = await self.layers.package_layer(record, python, site_packages, subdir, report, bytecode)
            report.layer(built, entry.size)
            if progress:
                progress.layer_done(subdir, record.file_name, built, record.size or 0)
            return entry

        package_layers = list(await asyncio.gather(*(one(r) for r in records)))
        started = time.monotonic()
        # The base's layers and the environment layer count against the budget too.
        room = max(1, self.config.layer_budget - len(base.layers) - 1)
        layers = await self.layers.grouped(package_layers, room)
        if progress:
            progress.assembling(subdir)

        created = created_of(records)
        lock = explicit_lock(records, subdir)
        account = image_account(self.config, request, records, base.passwd, base.group)
        ours = [*layers, await self.layers.env_layer(request, records, subdir, created, account)]
        report.stored(ours[-1].size)
        settings = image_settings(self.config, request, records, created, lock, account)
        history = [f"conda: {', '.join(entry.packages)}" for entry in ours]
        config_bytes = image_config(base.config, [e.diff_id for e in ours], settings, platform, history)
        config = Descriptor(OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes))
        await self.store.put_blob_bytes(config.digest, config_bytes)

        layer_type = _LAYER_MEDIA_TYPES[self.config.layer_compression]
        layer_descriptors = [*base.layers] + [
            Descriptor(layer_type, e.digest, e.size, annotations=layer_annotations(e.packages)) for e in ours
        ]
        annotations = manifest_annotations(request, created)
        oci = await self._put_manifest(OCI_MANIFEST, oci_manifest(config, layer_descriptors, annotations), platform)
        if layer_type == OCI_LAYER_ZSTD:
            # Docker schema 2 has no zstd layer type: the OCI manifest is the only one, and
            # negotiation.py serves it to Docker-family clients that accept OCI too.
            docker = oci
        else:
            docker = await self._put_manifest(DOCKER_MANIFEST, docker_manifest(config, layer_descriptors), platform)
        report.span("manifests", started)
        return PlatformImage(platform, oci, docker, lock)

    async def _bytecode_plan(self, request: ImageRequest, records: Sequence[rattler.RepoDataRecord],
                             python: rattler.RepoDataRecord | None, site_packages: str | None) -> BytecodePlan | None:
        """How this image's python modules are compiled; said once per build when they are not."""
        plan = await plan_bytecode(python, site_packages, self.state.interpreters)
        if isinstance(plan, BytecodePlan):
            return plan
        if any(wants_bytecode(r) for r in records):
            event(log, logging.WARNING, "python bytecode not compiled: containers compile at import time",
                  image=request.canonical_name, reason=plan)
        return None

    async def _put_manifest(self, media_type: str, data: bytes, platform: OciPlatform | None) -> Descriptor:
        digest = sha256_digest(data)
        await self.store.put_blob_bytes(digest, data)
        await self.store.put_record(kinds.MANIFEST_TYPES, kinds.digest_key(digest), {"media_type": media_type})
        return Descriptor(media_type, digest, len(data), platform=platform)

    async def _top_level(self, request: ImageRequest, images: Sequence[PlatformImage]) -> ImageRef:
        if len(self.config.platforms) == 1:
            (image,) = images
            return ImageRef(image.oci.digest, OCI_MANIFEST, image.docker.digest, image.docker.media_type)
        # Several platforms configured: an index, even when only some of them solved, so
        # that the kind of answer does not depend on which ones did.
        annotations = {"org.opencontainers.image.title": request.canonical_name}
        index = await self._put_manifest(OCI_INDEX, oci_index([i.oci for i in images], annotations), None)
        if self.config.layer_compression == ZSTD:  # OCI only, as each platform's manifest
            return ImageRef(index.digest, OCI_INDEX, index.digest, OCI_INDEX)
        listing = await self._put_manifest(
            DOCKER_MANIFEST_LIST, docker_manifest_list([i.docker for i in images]), None
        )
        return ImageRef(index.digest, OCI_INDEX, listing.digest, DOCKER_MANIFEST_LIST)


# The layer media type of each layer_compression (the layers/ package knows no OCI types).
_LAYER_MEDIA_TYPES = {GZIP: OCI_LAYER_GZIP, ZSTD: OCI_LAYER_ZSTD}


def _store_failed(request: ImageRequest, exc: StorageError) -> errors.Unavailable:
    # StorageError messages are path-free by contract.
    cause = f"{store_fault_reason(exc) or 'the store failed'}: {exc}"
    return errors.Unavailable(f"cannot build {request.canonical_name}: {cause}")


async def _all_or_nothing(work: Sequence) -> list:
    """Run the coroutines together; on the first failure (or a cancellation) cancel the rest.

    asyncio.gather alone leaves the others running when one fails.
    """
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
