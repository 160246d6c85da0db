"""The image service: the registry's questions about images, answered from the records
or by the pipeline.

    resolve(request, tag)                      a pull
      bases per platform (bases.py)            part of the cache key
      image record (records/cache.py)          fresh: served; expired: served, and refreshed
                                               in the background (stale-while-revalidate,
                                               stale-if-error); missing: built now
      a definitive failure (outcomes.py)       answered without solving again
      another replica building it              its record waited for (coordination.py)
      the build queue (admission.py)           bounded, per client, single flight
      the pipeline (pipeline.py)               solve, layers, manifests: blobs stored
      the image record                         written after its blobs: the image is visible
    prebuild(request, tag)                     the same build, without waiting for it
    look(request, tag)                         what it solves to, and what was built; no build

Records are written after the blobs they point to, so a crash at any point leaves
orphan blobs at worst, and the next request finishes the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable, Mapping, Sequence

import rattler

from condery.bases.errors import BaseImageError
from condery.build.admission import BuildQueue
from condery.build.assembly import PlatformImage, meta_settings
from condery.build.bases import PlatformBases
from condery.build.changeable import changeable_json
from condery.build.environments import Environments
from condery.build.image_layers import LayerBuilder
from condery.build.kernels import kernels_json
from condery.build.look import ImageLook, SolveCache, built_layers
from condery.build.outcomes import Outcomes
from condery.build.pipeline import BuildProgress, Job, Pipeline, store_failed
from condery.build.progress import BuildStatus, build_id
from condery.build.state import AppState
from condery.image.meta import MetaPackage
from condery.image.names import ImageRef, ImageRequest, parse_name
from condery.image.tags import Latest, Snapshot, tag_of
from condery.oci import errors
from condery.oci.references import walk
from condery.records import kinds
from condery.records.cache import RecordCache
from condery.records.freshness import Freshness, RepodataClock
from condery.records.keys import ImageKeys
from condery.records.schemas import BaseImage, ImageRecord
from condery.storage import StorageError

log = logging.getLogger("condery.build")

# Background refreshes enter the build queue as this client, so that together they hold
# at most max_builds_per_client slots and cold builds keep the rest.
REFRESH_CLIENT = "background-refresh"
HELD_SECONDS = 5.0  # how long holds() trusts what it read (a build in between adds digests)
HELD_RECHECK = 0.5  # a digest it did not hold is looked up again after this long, no sooner
HELD_ENTRIES = 1024


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
        self.bases = PlatformBases(self.config, self.store, state.http)
        self.pipeline = Pipeline(state, self.layers, self.repodata)
        self.keys = ImageKeys(self.config)
        self.environments = Environments(self.config, self.store)
        self.solves = SolveCache(self.freshness, self.config.max_concurrent_builds)  # look(): solves, no builds
        self._refreshes: dict[str, asyncio.Task[None]] = {}
        self._prebuilds: set[asyncio.Task[ImageRef]] = set()  # held here: the loop keeps weak references
        self._held: dict[str, tuple[float, frozenset[str]]] = {}  # holds(): name and channels -> the digests named

    @property
    def meta_packages(self) -> Mapping[str, MetaPackage]:
        return self.config.meta_packages

    @property
    def outcomes(self) -> Outcomes:
        """What became of builds: failures for the landing page, statuses for the builds API."""
        return self.state.outcomes

    # -- the registry's protocol ------------------------------------------------
    async def request_for(self, name: str, channels: Sequence[str] | None = None) -> ImageRequest:
        """What a repository name stands for: an environment (`env/<id>`, `envs/<name>`) or
        a list of specs and meta-packages. Raises NameInvalid, NameUnknown.

        `channels`: the configured channels the caller may read (auth's channel rules);
        the image is then solved with only those (and keyed by them)."""
        request = await self.environments.request_for(name) or parse_name(name, self.meta_packages)
        if channels is not None and set(channels) != set(self.config.channels):
            request = replace(request, channels=tuple(c for c in self.config.channels if c in set(channels)))
        kernels = [k for meta in request.meta for k in self.meta_packages[meta].kernels]
        if kernels:
            request = replace(request, kernels=await self.environments.kernels(kernels))
        return request

    def _fresh(self, request: ImageRequest, record: ImageRecord, reference: Latest | Snapshot) -> bool:
        # A lock is solved already: its image never changes, whatever the tag.
        frozen = request.environment is not None and request.environment.frozen
        return frozen or self.freshness.is_fresh(record, reference)

    async def resolve(self, request: ImageRequest, reference: Latest | Snapshot, client: str = "local") -> ImageRef:
        """The image for a name and tag; `client` (the peer address) is who pays for a cold build."""
        key, bases, record = await self._image_of(request, reference)
        if record is not None:
            if not self._fresh(request, record, reference):
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
        bases = await self.bases.for_platforms()
        key = self.keys.key(request, tag, bases)
        try:
            return key, bases, await self.records.image(key)
        except StorageError as exc:
            raise store_failed(request, exc) from None

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
            if not self._fresh(request, record, reference):
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

    async def holds(self, request: ImageRequest, digest: str) -> bool:
        """Whether an image this name and caller pull (any tag, this configuration and this
        caller's channels) names `digest`: under auth, a digest is fetched through the
        manifests that reference it, as Distribution links blobs to repositories, so a
        digest learned elsewhere does not pass a name's rule.

        Remembered per (name, caller's channels) for HELD_SECONDS, so the blobs of one pull
        cost one walk, not one per blob (each walk reads the tags index and every image
        record). A digest not in what was remembered is looked up again, at most once per
        HELD_RECHECK seconds: the image may have been built or refreshed since, and its
        client is fetching the blobs its new manifest names right now."""
        cache_key = f"{request.canonical_name}\n{request.channels!r}"
        known = self._held.get(cache_key)
        now = time.monotonic()
        if known is not None and now - known[0] <= HELD_SECONDS and (
                digest in known[1] or now - known[0] <= HELD_RECHECK):
            return digest in known[1]
        bases = await self.bases.for_platforms()
        roots: set[str] = set()
        for tag in await self.records.tags(request):
            record = await self.records.image(self.keys.key(request, tag, bases), quiet=True)
            if record is not None:
                roots.update((record.ref.oci_digest, record.ref.docker_digest))
        held: set[str] = set()
        async for visit in walk(roots, self.store.get_blob_bytes):
            held.add(visit.digest)
            if visit.found is not None:
                held.update(blob.digest for blob in visit.found.blobs)
        self._held.pop(cache_key, None)  # re-inserted last: the oldest entries go first
        self._held[cache_key] = (time.monotonic(), frozenset(held))
        while len(self._held) > HELD_ENTRIES:
            self._held.pop(next(iter(self._held)))
        return digest in held

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
        bases = await self.bases.for_platforms()
        built = await self.pipeline.build(Job(self.keys.key(request, tag_of(reference), bases), request, reference, bases,
                                              progress))
        return built.ref, built.images

    async def _build_and_record(
        self, key: str, request: ImageRequest, reference: Latest | Snapshot, bases: Mapping[str, BaseImage],
        progress: BuildProgress | None = None,
    ) -> ImageRef:
        try:
            built = await self.pipeline.build(Job(key, request, reference, bases, progress))
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

    # -- looking without building (the images API, the image pages) -----------------
    async def look(self, request: ImageRequest, reference: Latest | Snapshot) -> ImageLook:
        """What the name solves to now (cached like a pull) and, once built, what a pull gets."""
        tag = tag_of(reference)
        key, bases, record = await self._image_of(request, reference)
        try:
            failure = self.state.outcomes.unsolvable(key)
            if failure is not None:
                raise errors.ManifestUnknown(failure)
            solved = await self.solves.solve(key, reference, lambda: self.pipeline.solve_platforms(Job(key, request, reference, bases)))
            layers = None if record is None else await built_layers(self.store, record)
        except StorageError as exc:
            raise store_failed(request, exc) from None
        except errors.RegistryError as exc:
            self.state.outcomes.failed(request.canonical_name, tag, exc)
            raise
        return ImageLook(request.canonical_name, tag, solved, None if record is None else record.ref.oci_digest, layers,
                         kernels_json(request.kernels, self.config.prefix),
                         changeable_json(meta_settings(self.config, request), self.config.prefix))

    async def solve(self, request: ImageRequest, reference: Latest | Snapshot, subdir: str) -> list[rattler.RepoDataRecord]:
        """The records of one platform's solve (`condery solve`)."""
        self.repodata.refresh(self.config.channels, force=isinstance(reference, Snapshot))
        try:
            base = await self.bases.of(subdir)
        except BaseImageError as exc:
            raise errors.Unavailable(str(exc)) from None
        return await self.pipeline.solve(request, reference, subdir, base)
