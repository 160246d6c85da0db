"""From an image request to stored manifests: the glue between layers/ and registry/.

    ImageRequest + tag
      -> base image (registry/base_image)      per platform
      -> solve (layers/solve)                  against the base's glibc
      -> one layer per package (layers/package_layer), cached by package key
      -> groups under the layer budget (layers/grouping, a pure function)
      -> the environment layer (layers/env_layer)
      -> config + manifests (+ index) (registry/manifest, pure functions)
      -> store, then the image record that makes it visible

Records are written after the blobs they point to, so a crash at any point leaves
orphan blobs at worst, and the next request finishes the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import rattler

from condery.admission import BuildQueue
from condery.config import MetaPackage
from condery.layers import LayerBlob, PackageError, PackageUnavailable
from condery.layers.env_layer import build_env_layer, explicit_lock
from condery.layers.grouping import group_layers
from condery.layers.members import PackageLimits
from condery.layers.package_layer import build_package_layer, layer_key, python_site_packages
from condery.layers.solve import SolveError, SolveRequest, SolveUnavailable, SpecError, channel, solve
from condery.layers.tarball import concat_layers
from condery.registry import errors
from condery.registry.base_image import BaseImage, BaseImageError, resolve_base_image
from condery.registry.manifest import (
    Descriptor,
    ImageSettings,
    docker_manifest,
    docker_manifest_list,
    image_config,
    oci_index,
    oci_manifest,
    sha256_digest,
)
from condery.registry.names import ImageRef, ImageRequest
from condery.registry.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_CONFIG,
    OCI_MANIFEST,
)
from condery.registry.platforms import OciPlatform, oci_platform
from condery.registry.tags import Latest, Snapshot
from condery.singleflight import SingleFlight
from condery.state import AppState
from condery.storage import StorageError, store_fault_reason

log = logging.getLogger("condery.build")

LABEL_PREFIX = "org.condery"
_COMPLETE_CACHE_ENTRIES = 100_000


class BuildProgress(Protocol):
    """What a build reports as it goes (the CLI draws a progress bar from it)."""

    def solved(self, platform: str, packages: int) -> None: ...

    def layer_done(self, platform: str, package: str, built: bool) -> None: ...


@dataclass(frozen=True)
class LayerEntry:
    """A stored layer: the record kept under its cache key."""

    key: str
    digest: str
    diff_id: str
    size: int
    packages: tuple[str, ...]

    def as_record(self) -> dict:
        return {
            "digest": self.digest,
            "diff_id": self.diff_id,
            "size": self.size,
            "packages": list(self.packages),
        }

    @classmethod
    def from_record(cls, key: str, record: Mapping) -> "LayerEntry":
        return cls(key, record["digest"], record["diff_id"], record["size"], tuple(record["packages"]))


@dataclass(frozen=True)
class PlatformImage:
    platform: OciPlatform
    oci: Descriptor
    docker: Descriptor
    lock: str


def image_record_key(request: ImageRequest, tag: str) -> str:
    # "_" can never be a name component, so "<name>/_/<tag>" cannot collide with a
    # longer name, and listing "<name>/_/" gives exactly this name's tags.
    return f"{request.canonical_name}/_/{tag}"


def tag_of(reference: Latest | Snapshot) -> str:
    return "latest" if isinstance(reference, Latest) else reference.day.isoformat()


class ImageService:
    """Answers the registry's questions about images, building them when needed."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.config = state.config
        self.store = state.store
        # Image builds are single-flight inside the queue; its counts are for tests and
        # the landing page.
        self.builds: BuildQueue[ImageRef] = state.builds
        # A layer build nobody waits for any more (its image builds timed out) is cancelled.
        self._layers: SingleFlight[LayerEntry] = SingleFlight(cancel_abandoned=True)
        self._bases: SingleFlight[BaseImage] = SingleFlight()
        # Images whose blobs were all seen stored, with the store's removal_generation then.
        self._complete: dict[str, int] = {}
        self._repodata_fresh_at = 0.0

    @property
    def meta_packages(self) -> Mapping[str, MetaPackage]:
        return self.config.meta_packages

    # -- the registry's protocol ------------------------------------------------
    async def resolve(self, request: ImageRequest, reference: Latest | Snapshot, client: str = "local") -> ImageRef:
        """The image for a name and tag; `client` (the peer address) is who pays for a cold build."""
        tag = tag_of(reference)
        if isinstance(reference, Snapshot) and reference.exclude_newer > datetime.now(timezone.utc):
            raise errors.ManifestUnknown(f"snapshot {tag} has not ended yet (UTC); use :latest or a past day")
        key = image_record_key(request, tag)
        record = await self.store.get_record("images", key)
        if record is not None and not (await self._blobs_present(record["ref"]["oci_digest"])
                                       and await self._blobs_present(record["ref"]["docker_digest"])):
            # A blob it needs is gone (found corrupt and dropped): build again; the
            # layers still stored are reused, the missing one is rebuilt.
            log.warning("%s: the stored image misses a blob; building it again", key)
            record = None
        if record is not None and self._fresh(record, reference):
            return ImageRef(**record["ref"])
        failure = self.state.failed_solves.get(key)
        if failure is not None:
            raise errors.ManifestUnknown(failure)
        try:
            return await self.builds.run(key, client, lambda: self._build_and_record(request, reference))
        except (errors.TooManyRequests, errors.Unavailable) as exc:
            if record is None:
                raise
            # stale-if-error: an expired `latest` is still a good image while the re-solve
            # cannot happen now.
            log.warning("%s: serving the previous image: %s", key, exc.message)
            return ImageRef(**record["ref"])

    async def _blobs_present(self, top_digest: str) -> bool:
        """Whether every blob the image (index or manifest) reaches is stored.

        Checked once per image per process, and again after this process removed a blob:
        a warm pull costs nothing, and an image whose layer was dropped as corrupt is not
        served until it is whole again.
        """
        generation = self.store.removal_generation
        if self._complete.get(top_digest) == generation:
            return True
        pending, seen = [top_digest], set()
        while pending:
            digest = pending.pop()
            if digest in seen:
                continue
            seen.add(digest)
            try:
                document = json.loads(await self.store.get_blob_bytes(digest))
            except KeyError:
                return False
            children = [d["digest"] for d in document.get("manifests", [])]
            pending.extend(children)
            if not children:
                for blob in (document["config"]["digest"], *(layer["digest"] for layer in document["layers"])):
                    if await self.store.blob_info(blob) is None:
                        return False
        if len(self._complete) >= _COMPLETE_CACHE_ENTRIES:
            self._complete.clear()  # a memo, not a source of truth: dropping it costs a re-check
        self._complete[top_digest] = generation
        return True

    async def manifest_media_type(self, digest: str) -> str | None:
        record = await self.store.get_record("manifest-types", digest.split(":", 1)[-1])
        return None if record is None else record["media_type"]

    async def tags(self, request: ImageRequest) -> list[str]:
        prefix = image_record_key(request, "")
        keys = await self.store.list_records("images", prefix)
        found = {key[len(prefix):] for key in keys if "/" not in key[len(prefix):]}
        return sorted(found | {"latest"})

    # -- building -------------------------------------------------------------------
    def _fresh(self, record: Mapping, reference: Latest | Snapshot) -> bool:
        if isinstance(reference, Snapshot):
            return True  # a past day's solve never changes
        return time.time() - record["solved_at"] < self.config.latest_ttl

    async def build(
        self,
        request: ImageRequest,
        reference: Latest | Snapshot,
        progress: BuildProgress | None = None,
    ) -> tuple[ImageRef, list[PlatformImage]]:
        """Build (or reuse) every platform's image and store the top-level manifests.

        The caller bounds concurrency (the server's BuildQueue; the CLI builds one image).
        At `build_timeout` the work is cancelled, not only abandoned: the platforms' tasks,
        and with them every layer build no other image build waits for. What cannot be
        interrupted is code already running in a thread (a solve inside rattler, a layer's
        unpack/tar/gzip): its result is dropped when it ends. That is bounded by rattler's
        own solve timeout, by the package size limits, and by the default thread pool
        (at most cpu count + 4 such threads at once, whatever was cancelled).
        """
        try:
            images = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        self._build_platform(request, reference, subdir, progress)
                        for subdir in self.config.platforms
                    )
                ),
                timeout=self.config.build_timeout,
            )
        except SpecError as exc:
            raise errors.NameInvalid(str(exc)) from None
        except SolveUnavailable as exc:  # a passing fault (channel, timeout): not remembered
            raise errors.Unavailable(f"cannot solve {request.canonical_name}: {exc}") from None
        except SolveError as exc:
            message = f"cannot solve {request.canonical_name}: {exc}"
            # A definitive answer: repeating the name must not cost another solve for a while.
            # Keyed by name and tag; the cache lives in this AppState, so with this config.
            self.state.failed_solves.remember(image_record_key(request, tag_of(reference)), message)
            raise errors.ManifestUnknown(message) from None
        except PackageUnavailable as exc:
            raise errors.Unavailable(f"cannot build {request.canonical_name}: {exc}") from None
        except PackageError as exc:
            if (reason := store_fault_reason(exc)) is not None:  # a full disk, not a bad package
                raise errors.Unavailable(f"cannot build {request.canonical_name}: {reason}") from None
            raise errors.ManifestUnknown(f"cannot build {request.canonical_name}: {exc}") from None
        except BaseImageError as exc:
            raise errors.Unavailable(str(exc)) from None
        except asyncio.TimeoutError:  # before OSError: it is one
            raise errors.Unavailable(f"building took longer than {self.config.build_timeout} s") from None
        except StorageError as exc:  # path-free by contract
            cause = f"{store_fault_reason(exc) or 'the store failed'}: {exc}"
            raise errors.Unavailable(f"cannot build {request.canonical_name}: {cause}") from None
        except OSError as exc:  # the work directory's disk (ENOSPC, EIO, ...); its message names paths
            if (reason := store_fault_reason(exc)) is None:
                raise
            raise errors.Unavailable(f"cannot build {request.canonical_name}: {reason}") from None
        return await self._top_level(request, images), list(images)

    async def _build_and_record(self, request: ImageRequest, reference: Latest | Snapshot) -> ImageRef:
        ref, images = await self.build(request, reference)
        record = {
            "ref": ref.__dict__,
            "solved_at": time.time(),
            "platforms": {
                f"{i.platform.os}/{i.platform.architecture}": {
                    "oci": i.oci.digest,
                    "docker": i.docker.digest,
                    "lock_sha256": hashlib.sha256(i.lock.encode()).hexdigest(),
                }
                for i in images
            },
        }
        await self.store.put_record("images", image_record_key(request, tag_of(reference)), record)
        return ref

    async def solve(self, request: ImageRequest, reference: Latest | Snapshot, subdir: str) -> list[rattler.RepoDataRecord]:
        return await self._solve(request, reference, subdir, await self._base(subdir))

    async def _base(self, subdir: str) -> BaseImage:
        """The base image for a platform, fetched once however many builds need it."""
        platform = oci_platform(subdir)
        return await self._bases.run(
            subdir,
            lambda: resolve_base_image(
                self.config.base_image, platform, self.store, self.state.http, layer_budget=self.config.layer_budget
            ),
        )

    async def _solve(
        self, request: ImageRequest, reference: Latest | Snapshot, subdir: str, base: BaseImage
    ) -> list[rattler.RepoDataRecord]:
        if isinstance(reference, Latest) and time.monotonic() - self._repodata_fresh_at > self.config.latest_ttl:
            # `latest` means the channels as they are now: drop repodata older than the TTL.
            for name in self.config.channels:
                self.state.gateway.clear_repodata_cache(channel(name))
            self._repodata_fresh_at = time.monotonic()
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
        progress: BuildProgress | None,
    ) -> PlatformImage:
        platform = oci_platform(subdir)
        base = await self._base(subdir)
        records = await self._solve(request, reference, subdir, base)
        if progress:
            progress.solved(subdir, len(records))
        python = next((r for r in records if r.name.normalized == "python"), None)
        site_packages = python_site_packages(python)

        async def one(record: rattler.RepoDataRecord) -> LayerEntry:
            site = site_packages if record.noarch.python else None
            entry, built = await self._package_layer(record, python, layer_key(record, self.config.prefix, site), subdir)
            if progress:
                progress.layer_done(subdir, record.file_name, built)
            return entry

        package_layers = list(await asyncio.gather(*(one(r) for r in records)))
        # The base's layers and the environment layer count against the budget too.
        room = max(1, self.config.layer_budget - len(base.layers) - 1)
        layers = await self._grouped(package_layers, room)

        created = max((r.timestamp for r in records if r.timestamp), default=datetime(1970, 1, 1, tzinfo=timezone.utc))
        lock = explicit_lock(records, subdir)
        env_blob = await self._env_layer(request, records, subdir, created)
        env_entry = LayerEntry("env", env_blob.digest, env_blob.diff_id, env_blob.size, ("environment",))

        ours = [*layers, env_entry]
        settings = self._settings(request, records, created, lock)
        history = [f"conda: {', '.join(entry.packages)}" for entry in ours]
        config_bytes = image_config(base.config, [e.diff_id for e in ours], settings, platform, history)
        config = Descriptor(OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes))
        await self.store.put_blob_bytes(config.digest, config_bytes)

        layer_descriptors = [*base.layers] + [
            Descriptor(OCI_LAYER_GZIP, e.digest, e.size, annotations={f"{LABEL_PREFIX}.packages": " ".join(e.packages)})
            for e in ours
        ]
        annotations = {
            "org.opencontainers.image.created": created.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "org.opencontainers.image.title": request.canonical_name,
            "org.opencontainers.image.ref.name": tag_of(reference),
            "org.opencontainers.image.description": "conda environment: " + ", ".join(request.specs),
        }
        oci = await self._put_manifest(OCI_MANIFEST, oci_manifest(config, layer_descriptors, annotations), platform)
        docker = await self._put_manifest(DOCKER_MANIFEST, docker_manifest(config, layer_descriptors), platform)
        return PlatformImage(platform, oci, docker, lock)

    def _settings(
        self, request: ImageRequest, records: Sequence[rattler.RepoDataRecord], created: datetime, lock: str
    ) -> ImageSettings:
        prefix = self.config.prefix
        activate = f"{prefix}/etc/condery/activate.sh"
        env: dict[str, str] = {"CONDA_PREFIX": prefix, "LANG": "C.UTF-8", "BASH_ENV": activate, "ENV": activate}
        if any(r.name.normalized == "ca-certificates" for r in records):
            bundle = f"{prefix}/ssl/cacert.pem"
            env.update(SSL_CERT_FILE=bundle, REQUESTS_CA_BUNDLE=bundle, CURL_CA_BUNDLE=bundle)
        user = workdir = None
        cmd: Sequence[str] | None = None
        for name in request.meta:
            meta = self.config.meta_packages[name]
            env.update(meta.env)
            user = meta.user or user
            workdir = meta.workdir or workdir
            cmd = meta.cmd or cmd
        labels = {
            f"{LABEL_PREFIX}.name": request.canonical_name,
            f"{LABEL_PREFIX}.specs": json.dumps(list(request.specs)),
            f"{LABEL_PREFIX}.lock.digest": "sha256:" + hashlib.sha256(lock.encode()).hexdigest(),
        }
        return ImageSettings(
            env=env,
            path_prefix=f"{prefix}/bin",
            labels=labels,
            user=user,
            workdir=workdir,
            cmd=cmd,
            created=created,
        )

    async def _put_manifest(self, media_type: str, data: bytes, platform: OciPlatform | None) -> Descriptor:
        digest = sha256_digest(data)
        await self.store.put_blob_bytes(digest, data)
        await self.store.put_record("manifest-types", digest.split(":", 1)[1], {"media_type": media_type})
        return Descriptor(media_type, digest, len(data), platform=platform)

    async def _top_level(self, request: ImageRequest, images: Sequence[PlatformImage]) -> ImageRef:
        if len(images) == 1:
            (image,) = images
            return ImageRef(image.oci.digest, OCI_MANIFEST, image.docker.digest, DOCKER_MANIFEST)
        annotations = {"org.opencontainers.image.title": request.canonical_name}
        index = await self._put_manifest(OCI_INDEX, oci_index([i.oci for i in images], annotations), None)
        listing = await self._put_manifest(
            DOCKER_MANIFEST_LIST, docker_manifest_list([i.docker for i in images]), None
        )
        return ImageRef(index.digest, OCI_INDEX, listing.digest, DOCKER_MANIFEST_LIST)

    # -- layers -------------------------------------------------------------------
    async def _package_layer(
        self, record: rattler.RepoDataRecord, python: rattler.RepoDataRecord | None, key: str, subdir: str
    ) -> tuple[LayerEntry, bool]:
        """The package's layer from the cache, or built now (once, however many ask)."""
        cached = await self._cached_layer(key)
        if cached is not None:
            return cached, False

        async def build() -> LayerEntry:
            blob = await build_package_layer(
                record,
                python_record=python,
                prefix=self.config.prefix,
                platform=subdir,
                work_dir=self.state.work_dir,
                package_cache_dir=self.config.package_cache_dir,
                allow_scripts=self.config.allow_package_scripts,
                limits=PackageLimits(self.config.max_package_unpacked_size, self.config.max_package_files),
                download_slots=self.state.download_slots,
                cpu_slots=self.state.cpu_slots,
                client=self.state.download_client,
            )
            return await self._store_layer(key, blob, (record.file_name,))

        return await self._layers.run(key, build), True

    async def _cached_layer(self, key: str) -> LayerEntry | None:
        record = await self.store.get_record("layers", key)
        if record is None or await self.store.blob_info(record["digest"]) is None:
            return None
        return LayerEntry.from_record(key, record)

    async def _store_layer(self, key: str, blob: LayerBlob, packages: tuple[str, ...]) -> LayerEntry:
        await self.store.put_blob_file(blob.digest, blob.path)
        entry = LayerEntry(key, blob.digest, blob.diff_id, blob.size, packages)
        await self.store.put_record("layers", key, entry.as_record())
        return entry

    async def _grouped(self, package_layers: Sequence[LayerEntry], room: int) -> list[LayerEntry]:
        """Package layers in install order, merged into groups when they exceed `room`."""
        if len(package_layers) <= room:
            return list(package_layers)
        position = {entry.key: i for i, entry in enumerate(package_layers)}
        by_key = {entry.key: entry for entry in package_layers}
        groups = group_layers({e.key: e.size for e in package_layers}, room)
        groups = sorted(groups, key=lambda g: min(position[k] for k in g.members))
        merged = []
        for group in groups:
            members = sorted(group.members, key=position.__getitem__)
            if len(members) == 1:
                merged.append(by_key[members[0]])
            else:
                merged.append(await self._group_layer([by_key[k] for k in members]))
        return merged

    async def _group_layer(self, members: Sequence[LayerEntry]) -> LayerEntry:
        key = "group/" + hashlib.sha256("\n".join(m.key for m in members).encode()).hexdigest()
        cached = await self._cached_layer(key)
        if cached is not None:
            return cached

        async def build() -> LayerEntry:
            with tempfile.TemporaryDirectory(dir=self.state.work_dir) as tmp:
                paths = []
                for i, member in enumerate(members):
                    path = Path(tmp) / f"{i}.tar.gz"
                    with open(path, "wb") as handle:
                        async for chunk in self.store.read_blob(member.digest):
                            handle.write(chunk)
                    paths.append(path)
                out = Path(tmp) / "group.tar.gz"
                blob = await asyncio.to_thread(concat_layers, paths, out)
                packages = tuple(p for m in members for p in m.packages)
                return await self._store_layer(key, blob, packages)

        return await self._layers.run(key, build)

    async def _env_layer(
        self,
        request: ImageRequest,
        records: Sequence[rattler.RepoDataRecord],
        subdir: str,
        created: datetime,
    ) -> LayerBlob:
        with tempfile.TemporaryDirectory(dir=self.state.work_dir) as tmp:
            blob = await asyncio.to_thread(
                build_env_layer,
                records,
                requested_specs=request.specs,
                prefix=self.config.prefix,
                platform=subdir,
                created=created,
                out_path=Path(tmp) / "env.tar.gz",
                command=f"condery {request.canonical_name}",
            )
            await self.store.put_blob_file(blob.digest, blob.path)
        return blob
