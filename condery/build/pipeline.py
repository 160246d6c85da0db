"""The pipeline: from a request, a tag and its bases to stored manifests, read top to bottom.

    build(Job(key, request, reference, bases, progress))
      per platform, together (_platforms, all or nothing, within build_timeout):
        solve                 layers/solve: channels, virtual packages, the snapshot's date
        package layers        image_layers.py: each from the cache or built once, in parallel
        grouped               under the layer budget (the base's layers count too)
        environment layer     conda-meta/history, the explicit lock, activation
        config + manifests    assembly.py, oci/manifest.py (pure), stored
      top level               one platform: its manifests; several: an index and a list

Blobs are stored before anything names them, so a crash at any point leaves orphan
blobs at worst. Records are the service's business (service.py): the pipeline stores
blobs and returns what it built. Every failure leaves as one of the registry's errors:
MANIFEST_UNKNOWN (404) for a definitive "no" (the solver cannot satisfy the name on any
platform, a package is refused), UNAVAILABLE (503) for a passing fault (a channel, the
base, the store, a timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Protocol, Sequence

import rattler

from condery.build.assembly import (
    PlatformImage,
    created_of,
    image_account,
    image_settings,
    layer_annotations,
    manifest_annotations,
    meta_settings,
)
from condery.build.changeable import changeable_files, environment_owner, pinned_file
from condery.build.image_layers import LayerBuilder
from condery.build.kernels import kernel_prefix, kernelspec_files
from condery.build.look import Solved, SolvedPlatform, solved_platform
from condery.build.readback import in_image_files
from condery.build.state import AppState
from condery.image.environment import EnvironmentFileError, Kernel, solve_channels
from condery.image.names import ImageRef, ImageRequest, kernel_request
from condery.image.tags import Latest, Snapshot, tag_of
from condery.layers import PackageError, PackageUnavailable
from condery.layers.activation import Activation, evaluate_activation
from condery.layers.bytecode import BytecodePlan, plan_bytecode, wants_bytecode
from condery.layers.compression import GZIP, ZSTD
from condery.layers.env_layer import explicit_lock
from condery.layers.package_layer import python_site_packages
from condery.layers.pip_resolve import PinnedWheel, PipTarget, provided_by_conda, resolve_wheels
from condery.layers.solve import SolveError, SolveRequest, SolveUnavailable, SpecError, locked_records, solve
from condery.observability.build_report import BuildReport
from condery.observability.logs import event
from condery.oci import errors
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
from condery.oci.platforms import OciPlatform, oci_platform
from condery.records import kinds
from condery.records.freshness import RepodataClock
from condery.records.schemas import BaseImage, LayerEntry
from condery.storage import StorageError, store_fault_reason

log = logging.getLogger("condery.build")


class BuildProgress(Protocol):
    """What a build reports as it goes (the CLI draws a progress bar from it, the builds
    API keeps a progress.BuildStatus). Sizes are the packages' sizes in repodata."""

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
class Job:
    """One image build: what to build (a name, a tag), under which record key, on which bases."""

    key: str  # the image record's key (records/keys.py): a definitive failure is remembered by it
    request: ImageRequest
    reference: Latest | Snapshot
    bases: Mapping[str, BaseImage]  # conda subdir -> its base, as resolved for the key
    progress: BuildProgress | None = None


@dataclass(frozen=True)
class BuiltKernel:
    """A kernel's environment as built into one platform's image."""

    kernel: Kernel
    layers: list[LayerEntry]  # its package layers (grouped with the image's)
    env_layer: LayerEntry
    activation: Activation  # what its activate.d scripts export: the kernelspec's env


@dataclass(frozen=True)
class Built:
    ref: ImageRef
    images: list[PlatformImage]
    data_as_of: float
    skipped: Mapping[str, str] = field(default_factory=dict)


class Pipeline:
    def __init__(self, state: AppState, layers: LayerBuilder, repodata: RepodataClock) -> None:
        self.state = state
        self.config = state.config
        self.store = state.store
        self.layers = layers
        self.repodata = repodata

    async def build(self, job: Job) -> Built:
        """Every platform's image and the top-level manifests, with the build's start and end
        logged and its metrics counted; or a registry error."""
        report = BuildReport.start(job.request.canonical_name, tag_of(job.reference), self.config.platforms,
                                   self.state.metrics)
        try:
            built = await self._platforms(job, report)
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

    async def _platforms(self, job: Job, report: BuildReport) -> Built:
        """Every platform's image and the top-level manifests, or a registry error.

        The caller bounds concurrency (the server's BuildQueue; the CLI builds one image).
        At `build_timeout` the work is cancelled, not only abandoned: the platforms' tasks,
        and with them every layer build no other image build waits for. What cannot be
        interrupted is code already running in a thread (a solve inside rattler, a layer's
        unpack/tar/gzip): its result is dropped when it ends. That is bounded by rattler's
        own solve timeout, by the package size limits, and by the default thread pool
        (at most cpu count + 4 such threads at once, whatever was cancelled).
        """
        request, reference, name = job.request, job.reference, job.request.canonical_name
        # A date is solved against repodata read now: one asked for the first time must not
        # be answered from data loaded before packages of that day were uploaded.
        data_as_of = self.repodata.refresh(self.config.channels, force=isinstance(reference, Snapshot))
        try:
            results = await asyncio.wait_for(
                _all_or_nothing(
                    [self._platform(job, subdir, report)
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
            raise store_failed(request, exc) from None
        except OSError as exc:  # the work directory's disk (ENOSPC, EIO, ...); its message names paths
            if (reason := store_fault_reason(exc)) is None:
                raise
            raise errors.Unavailable(f"cannot build {name}: {reason}") from None
        images = [r for r in results if isinstance(r, PlatformImage)]
        skipped = {r.subdir: r.reason for r in results if isinstance(r, Unsolvable)}
        if not images:
            await self._deny_if_private(job)
            raise self._unsolvable(job.key, name, skipped)
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

    async def solve_platforms(self, job: Job) -> Solved:
        """Every platform's solve, without building (look())."""
        request, reference, name = job.request, job.reference, job.request.canonical_name
        data_as_of = self.repodata.refresh(self.config.channels, force=isinstance(reference, Snapshot))

        async def one(subdir: str) -> SolvedPlatform | Unsolvable:
            try:
                records = await self.solve(request, reference, subdir, job.bases[subdir])
            except SolveUnavailable:
                raise
            except SolveError as exc:
                return Unsolvable(subdir, str(exc))
            wheels = await self.pip(request, reference, subdir, job.bases[subdir], records)
            return solved_platform(records, subdir, [w for w, _ in wheels])

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
            await self._deny_if_private(job)
            raise self._unsolvable(job.key, name, skipped)
        return Solved(data_as_of, platforms, skipped)

    async def solve(
        self, request: ImageRequest, reference: Latest | Snapshot, subdir: str, base: BaseImage
    ) -> list[rattler.RepoDataRecord]:
        """One platform's records: solved from the specs, or a lock's packages as locked."""
        environment = request.environment
        channels, specs = self._channels_and_specs(request)
        if environment is not None and environment.locked is not None:
            packages = environment.locked.get(subdir)
            if packages is None and set(environment.locked) == {"noarch"}:
                packages = environment.locked["noarch"]  # an all-noarch lock fits every platform
            if packages is None:
                raise SolveError(f"the lock has no packages for {subdir} (it has {', '.join(sorted(environment.locked))})")
            records = await locked_records(packages, channels, self.state.gateway, timeout=self.config.solve_timeout)
        else:
            records = await solve(
                SolveRequest(
                    specs=specs,
                    platform=subdir,
                    glibc=base.glibc_version,
                    exclude_newer=reference.exclude_newer if isinstance(reference, Snapshot) else None,
                ),
                channels,
                self.state.gateway,
                timeout=self.config.solve_timeout,
            )
        if len(records) > self.config.max_packages:
            raise SolveError(
                f"the environment has {len(records)} packages; this registry allows {self.config.max_packages}"
            )
        return records

    def _channels_and_specs(self, request: ImageRequest) -> tuple[Sequence[str], Sequence[str]]:
        """The channels a request is solved with, in priority order, and its specs: the
        configured ones, or those its caller may read (auth's channel rules)."""
        readable = self.config.channels if request.channels is None else request.channels
        if request.environment is None:
            return readable, request.specs
        try:
            return solve_channels(request.environment, readable)
        except EnvironmentFileError as exc:
            if request.channels is not None:
                try:
                    solve_channels(request.environment, self.config.channels)
                except EnvironmentFileError:
                    pass
                else:  # served, but from a channel this caller may not read
                    raise _denied(request) from None
            raise SpecError(str(exc)) from None  # the configuration changed since the file was pushed

    async def _deny_if_private(self, job: Job) -> None:
        """A name the caller's channels cannot solve, that every configured channel can: 403
        DENIED (its packages are another's to read), not a 404 that would say it does not
        exist. The caller learns nothing of the private packages."""
        if job.request.channels is None:
            return
        everything = replace(job.request, channels=None)
        for subdir in self.config.platforms:
            try:
                await self.solve(everything, job.reference, subdir, job.bases[subdir])
            except SolveError:
                continue
            raise _denied(job.request)

    async def pip(
        self, request: ImageRequest, reference: Latest | Snapshot, subdir: str, base: BaseImage,
        records: Sequence[rattler.RepoDataRecord], prefix: str | None = None,
    ) -> list[tuple[PinnedWheel, PipTarget]]:
        """The environment's pip packages on top of its conda records: a lock's wheels as
        locked, else its `pip:` requirements resolved against pypi_index (wheels only)."""
        environment = request.environment
        if environment is None or not (environment.pip or environment.locked_pip):
            return []
        python = next((r for r in records if r.name.normalized == "python"), None)
        site_packages = python_site_packages(python)
        if python is None or site_packages is None:
            raise SolveError("pip packages need python in the environment")
        major, minor = rattler.Version(str(python.version)).as_major_minor()
        target = PipTarget(
            python=f"{major}.{minor}", subdir=subdir, glibc=base.glibc_version, prefix=prefix or self.config.prefix,
            site_packages=site_packages,
            exclude_newer=reference.exclude_newer if isinstance(reference, Snapshot) else None,
        )
        if environment.locked is not None:
            wheels = [PinnedWheel(w.name, w.version, w.filename, w.url, w.sha256)
                      for w in environment.locked_pip.get(subdir, ())]
        else:
            wheels = await resolve_wheels(environment.pip, target, provided_by_conda(records), self.config.pypi_index,
                                          timeout=self.config.solve_timeout, work_dir=self.state.work_dir)
        return [(wheel, target) for wheel in sorted(wheels, key=lambda w: w.name)]

    async def _platform(self, job: Job, subdir: str, report: BuildReport) -> PlatformImage | Unsolvable:
        """One platform's image: solve, package layers, groups, the environment layer,
        config and manifests (an Unsolvable when the solver cannot satisfy it there)."""
        request, reference, progress, base = job.request, job.reference, job.progress, job.bases[subdir]
        platform = oci_platform(subdir)
        if progress:
            progress.solving(subdir)
        started = time.monotonic()
        try:
            records = await self.solve(request, reference, subdir, base)
        except SolveUnavailable:
            raise  # a passing fault fails the whole image: a partial one would be cached
        except SolveError as exc:
            return Unsolvable(subdir, str(exc))
        finally:
            report.span("solve", started)
        report.solved(len(records), started)
        if progress:
            progress.solved(subdir, len(records), sum(r.size or 0 for r in records))
        meta = meta_settings(self.config, request)
        owner = environment_owner(meta)  # a changeable environment's user, or root
        pinned = await self.pip(request, reference, subdir, base, records)
        # The image reads back as files (build/readback.py), and holds them in conda-meta/:
        # written (YAML, a few hundred ms for 300 packages) in a thread while layers build.
        solved = solved_platform(records, subdir, [wheel for wheel, _ in pinned])
        channels = self._channels_and_specs(request)[0]
        readable_files = asyncio.ensure_future(asyncio.to_thread(
            in_image_files, request.canonical_name, subdir, solved, request, channels))
        try:
            package_layers = await self._environment_layers(request, reference, subdir, base, records, report,
                                                            progress, pinned=pinned, owner=owner)
            # What the environment's activate.d scripts export (layers/activation.py): the config's
            # Env, and an activating entrypoint for the scripts that cannot be evaluated.
            activation = await evaluate_activation([e.scripts for e in package_layers if e.scripts], self.config.prefix)
            kernels = [await self._kernel(kernel, job, subdir, report, owner) for kernel in request.kernels]
            for built_kernel in kernels:
                package_layers += built_kernel.layers
            started = time.monotonic()
            # The base's layers and the environment layers count against the budget too.
            room = max(1, self.config.layer_budget - len(base.layers) - 1 - len(kernels))
            layers = await self.layers.grouped(package_layers, room)
            layers += [built_kernel.env_layer for built_kernel in kernels]
            if progress:
                progress.assembling(subdir)

            created = created_of(records)
            lock = explicit_lock(records, subdir)
            account = image_account(self.config, request, records, base.passwd, base.group)
            readable = await readable_files
        except BaseException:
            readable_files.cancel()
            await asyncio.gather(readable_files, return_exceptions=True)
            raise
        readable.update(kernelspec_files([(k.kernel, k.activation) for k in kernels], self.config.prefix))
        if meta.changeable:
            readable.update(changeable_files(channels, records, request.specs, self.config.pypi_index))
        ours = [*layers, await self.layers.env_layer(request, records, subdir, created, account, readable,
                                                           activation=activation, owner=owner)]
        report.stored(ours[-1].size)
        settings = image_settings(self.config, request, records, created, lock, account, activation=activation,
                                  scratch=base.config is None)
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

    async def _environment_layers(
        self, request: ImageRequest, reference: Latest | Snapshot, subdir: str, base: BaseImage,
        records: Sequence[rattler.RepoDataRecord], report: BuildReport, progress: BuildProgress | None,
        prefix: str | None = None, owner: tuple[int, int] | None = None,
        pinned: list[tuple[PinnedWheel, PipTarget]] | None = None,
    ) -> list[LayerEntry]:
        """One environment's package layers (conda's, then pip's) at `prefix` (the image's
        own by default), each from the cache or built once, in parallel; owned by `owner`
        (uid, gid) when the environment is changeable (build/changeable.py); `pinned` its
        pip packages when the caller resolved them already."""
        python = next((r for r in records if r.name.normalized == "python"), None)
        site_packages = python_site_packages(python)
        bytecode = await self._bytecode_plan(request, records, python, site_packages)

        async def one(record: rattler.RepoDataRecord) -> LayerEntry:
            entry, built = await self.layers.package_layer(record, python, site_packages, subdir, report, bytecode,
                                                           prefix=prefix, owner=owner)
            report.layer(built, entry.size)
            if progress:
                progress.layer_done(subdir, record.file_name, built, record.size or 0)
            return entry

        if pinned is None:
            pinned = await self.pip(request, reference, subdir, base, records, prefix)

        async def one_wheel(wheel: PinnedWheel, target: PipTarget) -> LayerEntry:
            entry, built = await self.layers.wheel_layer(wheel, target, bytecode, owner)
            report.layer(built, entry.size)
            if progress:
                progress.layer_done(subdir, wheel.filename, built, 0)
            return entry

        # pip's packages after conda's: they may need them, never the other way round.
        return list(await asyncio.gather(*(one(r) for r in records), *(one_wheel(w, t) for w, t in pinned)))

    async def _kernel(self, kernel: Kernel, job: Job, subdir: str, report: BuildReport,
                      owner: tuple[int, int] | None = None) -> BuiltKernel:
        """A kernel's environment at <prefix>/envs/<name>: its package layers (shared by every
        image that places it there), its own environment layer, and what its activation
        scripts export (for its kernelspec's env). `owner`: the image's changeable
        environment's, whose package manager changes the kernels' environments too."""
        # A kernel's environment draws from the caller's channels as the image's does.
        request, base = replace(kernel_request(kernel), channels=job.request.channels), job.bases[subdir]
        prefix = kernel_prefix(self.config.prefix, kernel)
        try:
            records = await self.solve(request, job.reference, subdir, base)
        except SolveUnavailable:
            raise
        except SolveError as exc:
            raise SolveError(f"kernel {kernel.name}: {exc}") from None
        layers = await self._environment_layers(request, job.reference, subdir, base, records, report,
                                                job.progress, prefix, owner)
        activation = await evaluate_activation([e.scripts for e in layers if e.scripts], prefix)
        # A changeable image's `conda install -n <name>` keeps the kernel's python too.
        files = None if owner is None else {"conda-meta/pinned": pinned_file(records, request.specs)}
        env_layer = await self.layers.env_layer(request, records, subdir, created_of(records), files=files,
                                                prefix=prefix, activation=activation, owner=owner)
        report.stored(env_layer.size)
        return BuiltKernel(kernel, layers, env_layer, activation)

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


def _denied(request: ImageRequest) -> errors.Denied:
    return errors.Denied(f"{request.canonical_name} needs packages from a channel you may not read")


def store_failed(request: ImageRequest, exc: StorageError) -> errors.Unavailable:
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
