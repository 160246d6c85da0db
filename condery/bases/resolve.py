"""The base image under every conda image: fetched, verified, stored, remembered.

Spec forms (configuration key `base_image`):
- `REGISTRY/REPO:TAG@sha256:<digest>` or `REGISTRY/REPO@sha256:<digest>`: pinned, never
  asked for again once imported;
- `REGISTRY/REPO:TAG`: the stored answer is reused for `refresh` seconds (configuration
  `base_image_refresh`), then the tag is asked for again; a tag that moved is imported
  anew (a new base digest makes new image keys, cache.py), and when the registry cannot
  answer the last good base stays in use (stale-if-error) and is retried after
  FAILED_REFRESH_RETRY seconds;
- `oci:PATH[:TAG]`: a local OCI image layout (read on every resolve, it is local and
  small; the layer work is cached by the manifest's digest);
- `scratch`: no base at all.

Every blob is verified against its digest and size before it is stored, layers are
also checked against the config's diff_ids while they are decompressed, and nothing is
stored unless the whole image verified. The result is recorded under the record kind
`base-images`, so later resolves make no network call until a tag's refresh is due.
Registry credentials come from `auth` (registry_auth.py: Docker config.json files).

A multi-platform index gives each built platform its own child (`_select_platform`:
os and architecture equal, variant equal or absent on either side, an exact variant
preferred), and an index without the platform is refused by name.

Uncompressed and zstd layers are recompressed to gzip once: a Docker schema 2 manifest
can only describe gzip layers, and every image is served in both families. The gzip
stream is deterministic (condery's own layer compressor, condery/layers/compression.py)
and recorded by the source layer's digest under `base-gzip-layers`, so every
replica sharing a store serves the same digest; its diff_id is checked against the
config's before it is used.

glibc detection (for the solver's `__glibc` virtual package) reads each layer's tar
stream once, in order, and the last layer with evidence wins. Evidence, strongest first:
the dpkg record of `libc6` (`var/lib/dpkg/status` or distroless `status.d/`), the
"GNU C Library ... version X.Y" banner inside `libc.so.6`, and a versioned file name
`libc-X.Y.so` / `ld-X.Y.so` (glibc before 2.34). None when nothing is found (musl,
scratch, busybox).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import stat
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping, Protocol

import aiohttp
import zstandard

from condery.common.jsonobject import json_object
from condery.layers.compression import GzipChunkWriter, open_decompressed
from condery.oci.media_types import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)
from condery.oci.manifest import (
    LAYER_TYPES,
    Descriptor,
    ManifestError,
    parse_descriptor,
)
from condery.oci.platforms import OciPlatform
from condery.bases.auth import RegistryAuth
from condery.bases.upstream import (
    MAX_MANIFEST_SIZE,
    FetchedManifest,
    ImageReference,
    UpstreamClient,
    UpstreamError,
)
from condery.records import kinds
from condery.records.schemas import SCRATCH, BaseImage
from condery.storage import Store
from condery.oci.grammar import is_digest, is_tag

log = logging.getLogger("condery.base_image")

# Layer types a Docker manifest cannot carry; gzip (also non-distributable) passes as is.
REGZIP_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_ZSTD})
MAX_CONFIG_SIZE = 8 << 20
# What one base may make us download (the sum of its distinct layers' declared sizes)
# and hash once decompressed. A module constant rather than a configuration key: the
# largest real bases (CUDA devel images) are a few GB compressed and tens unpacked, so
# these bounds only ever stop a hostile or broken base, never one an operator chose.
MAX_BASE_SIZE = 20 << 30
MAX_BASE_UNPACKED_SIZE = 64 << 30
# Layers besides the base's that every image has: at least one of packages, and the
# environment's own (build.py's grouping keeps the image within layer_budget).
OWN_LAYERS = 2
_MAX_MESSAGE = 500  # error text quotes untrusted JSON: keep the client's answer short
_REF_NAME = "org.opencontainers.image.ref.name"
DEFAULT_REFRESH = 24 * 3600  # seconds a base pinned only by tag is used before asking again
# After a failed refresh, the seconds before the next attempt: soon enough to pick up the
# registry's return, rare enough that a registry that hangs does not slow every pull.
FAILED_REFRESH_RETRY = 60
REFRESH_CHECK_TIMEOUT = 10  # seconds the tag's manifest request of a refresh may take


class BaseImageError(RuntimeError):
    """The base image cannot be used: bad spec, unreachable, or it failed verification."""


async def resolve_base_image(
    spec: str,
    platform: OciPlatform,
    store: Store,
    session: aiohttp.ClientSession,
    *,
    layer_budget: int,
    auth: RegistryAuth | None = None,
    refresh: float = DEFAULT_REFRESH,
) -> BaseImage:
    """The base image for `platform`, imported into `store` on first use.

    `layer_budget` is the configuration's: a base may bring at most
    `layer_budget - OWN_LAYERS` layers, checked before anything is downloaded.
    `refresh`: seconds before a base pinned only by tag is asked for again.
    """
    spec = spec.strip()
    if spec == "scratch":
        return SCRATCH
    try:
        image = await _resolve(spec, platform, store, _Fetch(session, auth, refresh), layer_budget)
        if len(image.layers) > layer_budget - OWN_LAYERS:  # recorded under a larger budget
            raise _too_many_layers(len(image.layers), layer_budget)
        return image
    except (BaseImageError, UpstreamError, ManifestError, asyncio.TimeoutError) as exc:
        # One kind of error for every broken base; the client sees what failed, the log
        # also where (a layout's path is the operator's, not the client's business).
        message = str(exc) or "timed out"
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "..."
        log.warning("%s: %s", f"base image {spec}" if spec.startswith("oci:") else describe_base(spec), message)
        raise BaseImageError(f"{describe_base(spec)}: {message}") from None


@dataclass(frozen=True)
class _Fetch:
    """How a registry base is fetched and how long a tag's answer stands."""

    session: aiohttp.ClientSession
    auth: RegistryAuth | None
    refresh: float


async def _resolve(spec: str, platform: OciPlatform, store: Store, fetch: _Fetch, layer_budget: int) -> BaseImage:
    if spec.startswith("oci:"):
        layout = _Layout.from_spec(spec[len("oci:") :])
        # A layout can change under the same path: key the work by what it holds now.
        layout_root = await asyncio.to_thread(layout.root_manifest)
        key = _record_key(f"oci-manifest:{layout_root.digest}", platform)
        cached = await _from_record(store, key)
        if cached is not None:
            return cached[0]
        return await _import_and_record(spec, layout, layout_root, platform, store, key, layer_budget)

    ref = _parse_reference(spec)
    key = _record_key(str(ref), platform)
    source = _Registry(UpstreamClient(fetch.session, auth=fetch.auth), ref)
    cached = await _from_record(store, key)
    if ref.digest is not None:  # pinned: what the digest names never changes
        if cached is not None:
            return cached[0]
        root = await source.get_manifest(ref.digest)
        return await _import_and_record(spec, source, root, platform, store, key, layer_budget)
    if cached is None:
        root = await source.get_manifest(ref.tag or "latest")
        return await _import_and_record(spec, source, root, platform, store, key, layer_budget)

    image, record = cached
    checked_at = record.get("checked_at")
    now = time.time()
    if isinstance(checked_at, (int, float)) and 0 <= now - checked_at < fetch.refresh:
        return image
    try:
        # Bounded: a pull waits for this check, and a registry that hangs must not hold it
        # for aiohttp's connect and read timeouts; a timeout is a failed refresh.
        root = await asyncio.wait_for(source.get_manifest(ref.tag or "latest"), REFRESH_CHECK_TIMEOUT)
        if root.digest == record.get("root"):  # the tag has not moved: the stored base stands
            await store.put_record(kinds.BASE_IMAGES, key, {**record, "checked_at": now})
            return image
        refreshed = await _import_and_record(spec, source, root, platform, store, key, layer_budget)
    except (BaseImageError, UpstreamError, ManifestError, asyncio.TimeoutError) as exc:
        # stale-if-error: the last good base serves until the registry answers again.
        log.warning("%s: refresh failed, using the base resolved before (%s): %s",
                    describe_base(spec), record.get("manifest"), str(exc)[:_MAX_MESSAGE] or "timed out")
        retry_at = now - fetch.refresh + min(fetch.refresh, FAILED_REFRESH_RETRY)
        await store.put_record(kinds.BASE_IMAGES, key, {**record, "checked_at": retry_at})
        return image
    if refreshed.layers != image.layers or refreshed.config != image.config:
        log.info("%s for %s: the tag moved to %s", describe_base(spec), platform, root.digest)
    return refreshed


async def _import_and_record(
    spec: str, source: "_Source", root: FetchedManifest, platform: OciPlatform, store: Store, key: str,
    layer_budget: int,
) -> BaseImage:
    image, record = await _import(source, root, platform, store, layer_budget)
    # `root`: what the tag pointed at (an index or a manifest), compared at each refresh.
    record.update(spec=spec, root=root.digest, checked_at=time.time())
    await store.put_record(kinds.BASE_IMAGES, key, record)
    return image


def _parse_reference(spec: str) -> ImageReference:
    try:
        return ImageReference.parse(spec)
    except ValueError as exc:
        raise BaseImageError(str(exc)) from None


def describe_base(spec: str) -> str:
    """The base named for a client: no layout path, and nothing of a malformed reference
    (it may hold a `user:password@`, which references cannot carry)."""
    if spec.startswith("oci:"):
        return "the base image's OCI layout"
    try:
        return f"base image {ImageReference.parse(spec)}"
    except ValueError:
        return "base_image"


def _too_many_layers(count: int, layer_budget: int) -> BaseImageError:
    return BaseImageError(
        f"{count} layers; with layer_budget {layer_budget} a base may have at most "
        f"{max(0, layer_budget - OWN_LAYERS)} (every image adds at least {OWN_LAYERS} layers of its own)"
    )


def _record_key(text: str, platform: OciPlatform) -> str:
    slug = "-".join(p for p in (platform.os, platform.architecture, platform.variant) if p)
    return f"{slug}/{hashlib.sha256(text.encode()).hexdigest()}"


async def _from_record(store: Store, key: str) -> tuple[BaseImage, dict[str, Any]] | None:
    """The recorded image and its record, if the record is sound and all its blobs are
    still stored."""
    record = await store.get_record(kinds.BASE_IMAGES, key)
    if record is None:
        return None
    try:
        layers = tuple(parse_descriptor(d) for d in record["layers"])
        diff_ids = tuple(record["diff_ids"])
        config_digest = record["config"]
        glibc = record.get("glibc")
        accounts = record.get("accounts")
        if accounts is not None:
            passwd, group = accounts.get("passwd"), accounts.get("group")
    except (KeyError, TypeError, AttributeError, ManifestError):
        return None  # an unreadable record is rebuilt, not trusted
    if any(layer.media_type in REGZIP_TYPES for layer in layers):
        return None  # recorded before recompression existed: import again
    for digest in {config_digest, *(layer.digest for layer in layers)}:
        if not isinstance(digest, str) or await store.blob_info(digest) is None:
            return None
    if accounts is None:
        # Recorded before accounts were read: read them from the stored layers rather
        # than import again, which a site whose registry is out of reach could not do.
        try:
            found = await _stored_accounts(store, layers)
        except (ManifestError, OSError):
            return None
        passwd, group = found.get("passwd"), found.get("group")
        record = {**record, "accounts": {"passwd": passwd, "group": group}}
        await store.put_record(kinds.BASE_IMAGES, key, record)
    config = json.loads(await store.get_blob_bytes(config_digest))
    return BaseImage(config, layers, diff_ids, glibc if isinstance(glibc, str) else None,
                     passwd if isinstance(passwd, str) else None, group if isinstance(group, str) else None), record


class _Source(Protocol):
    async def get_manifest(self, reference: str) -> FetchedManifest: ...
    async def get_small_blob(self, desc: Descriptor, limit: int) -> bytes: ...
    async def fetch_blob(self, desc: Descriptor, directory: Path) -> Path: ...


@dataclass(frozen=True)
class _Registry:
    client: UpstreamClient
    ref: ImageReference

    async def get_manifest(self, reference: str) -> FetchedManifest:
        return await self.client.get_manifest(self.ref, reference)

    async def get_small_blob(self, desc: Descriptor, limit: int) -> bytes:
        return await self.client.get_small_blob(self.ref, desc.digest, desc.size, limit)

    async def fetch_blob(self, desc: Descriptor, directory: Path) -> Path:
        return await self.client.fetch_blob(self.ref, desc.digest, desc.size, directory)


@dataclass(frozen=True)
class _Layout:
    """A local OCI image layout; its files are as untrusted as an upstream's."""

    path: Path
    tag: str | None

    @classmethod
    def from_spec(cls, text: str) -> "_Layout":
        if not text:
            raise BaseImageError("oci: needs a path to an OCI image layout")
        head, sep, tail = text.rpartition(":")
        # "oci:DIR:TAG" unless DIR:TAG is itself the layout directory.
        if sep and is_tag(tail) and not (Path(text) / "index.json").is_file():
            path, tag = Path(head), tail
        else:
            path, tag = Path(text), None
        if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
            raise BaseImageError("not an OCI image layout (no oci-layout / index.json)")
        return cls(path, tag)

    def _blob_path(self, digest: str) -> Path:
        if not is_digest(digest):  # keeps the path inside blobs/sha256/
            raise ManifestError(f"not a sha256 digest: {digest!r}")
        return self.path / "blobs" / "sha256" / digest.split(":", 1)[1]

    @staticmethod
    def _open(path: Path, what: str) -> IO[bytes]:
        """A layout file opened for reading, if it is a regular file.

        O_NONBLOCK: a FIFO planted as a blob must not hang the open; a device
        (/dev/zero behind a symlink) is refused instead of read without end.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BaseImageError(f"cannot read {what}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BaseImageError(f"{what} is not a regular file")
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def _read(self, path: Path, limit: int, what: str) -> bytes:
        with self._open(path, what) as handle:
            try:
                data = handle.read(limit + 1)
            except OSError as exc:
                raise BaseImageError(f"cannot read {what}: {exc.strerror}") from None
        if len(data) > limit:
            raise BaseImageError(f"{what} is over the {limit} byte limit")
        return data

    def root_manifest(self) -> FetchedManifest:
        """The manifest or index that index.json names for our tag."""
        try:
            index = json.loads(self._read(self.path / "index.json", MAX_MANIFEST_SIZE, "index.json"))
            entries = [parse_descriptor(e) for e in index["manifests"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise BaseImageError(f"malformed index.json ({exc})") from None
        if self.tag is not None:
            chosen = [e for e in entries if (e.annotations or {}).get(_REF_NAME) == self.tag]
        elif len(entries) == 1:
            chosen = entries
        else:
            chosen = [e for e in entries if (e.annotations or {}).get(_REF_NAME) == "latest"]
        if len(chosen) != 1:
            names = sorted({(e.annotations or {}).get(_REF_NAME, "?") for e in entries})
            raise BaseImageError(f"no single image tagged {self.tag or 'latest'} (tags: {', '.join(names)})")
        return self._manifest(chosen[0].digest)

    def _manifest(self, digest: str) -> FetchedManifest:
        data = self._read(self._blob_path(digest), MAX_MANIFEST_SIZE, f"manifest {digest}")
        _check_bytes(data, digest, None)
        doc = _load_json(data, f"manifest {digest}")
        media_type = doc.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            # mediaType is optional in OCI documents; their shape tells which one it is.
            media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
        return FetchedManifest(data, media_type, digest)

    async def get_manifest(self, reference: str) -> FetchedManifest:
        return await asyncio.to_thread(self._manifest, reference)

    async def get_small_blob(self, desc: Descriptor, limit: int) -> bytes:
        if desc.size > limit:
            raise ManifestError(f"blob {desc.digest} of {desc.size} bytes is over the {limit} byte limit")
        data = await asyncio.to_thread(self._read, self._blob_path(desc.digest), desc.size, f"blob {desc.digest}")
        _check_bytes(data, desc.digest, desc.size)
        return data

    async def fetch_blob(self, desc: Descriptor, directory: Path) -> Path:
        return await asyncio.to_thread(self._copy_blob, desc, directory)

    def _copy_blob(self, desc: Descriptor, directory: Path) -> Path:
        fd, name = tempfile.mkstemp(dir=directory, prefix="layout-")
        hasher, copied = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, self._open(self._blob_path(desc.digest), f"blob {desc.digest}") as src:
                while chunk := src.read(1 << 20):
                    copied += len(chunk)
                    if copied > desc.size:
                        break
                    hasher.update(chunk)
                    out.write(chunk)
            if copied != desc.size or "sha256:" + hasher.hexdigest() != desc.digest:
                raise ManifestError(f"blob {desc.digest} does not match its digest or size")
        except OSError as exc:
            Path(name).unlink(missing_ok=True)
            raise BaseImageError(f"blob {desc.digest}: {exc.strerror}") from None
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)


def _short(value: object) -> str:
    """A value from an untrusted document, quoted for a message and kept short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_bytes(data: bytes, digest: str, size: int | None) -> None:
    if size is not None and len(data) != size:
        raise ManifestError(f"blob {digest} has {len(data)} bytes, expected {size}")
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ManifestError(f"blob {digest} does not match its digest")


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    doc = json_object(data)
    if doc is None:
        raise ManifestError(f"{what} is not a JSON object")
    return doc


def _select_platform(index: dict[str, Any], platform: OciPlatform) -> Descriptor:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError("index has no manifests list")
    candidates = []
    for raw in entries:
        desc = parse_descriptor(raw)
        p = desc.platform
        if p is not None and desc.media_type in MANIFEST_TYPES and platform.matches(p.os, p.architecture, p.variant):
            candidates.append(desc)
    if not candidates:
        raise ManifestError(f"the image index has no manifest for {platform}")
    # An exact variant match beats an entry that simply omits the variant.
    exact = [d for d in candidates if d.platform and d.platform.variant == platform.variant]
    return (exact or candidates)[0]


def parse_image_manifest(doc: dict[str, Any], layer_budget: int) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """The config and layer descriptors of an untrusted image manifest, in order.

    Refuses more layers than `layer_budget` leaves room for, and a base whose distinct
    layers would make us download more than MAX_BASE_SIZE: both before a byte of them
    is fetched.
    """
    config_desc = parse_descriptor(doc.get("config"))
    if config_desc.media_type not in CONFIG_TYPES:
        raise ManifestError(f"config media type {_short(config_desc.media_type)} is not an image config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ManifestError("manifest has no layers list")
    if len(raw_layers) > layer_budget - OWN_LAYERS:
        raise _too_many_layers(len(raw_layers), layer_budget)
    layers = tuple(parse_descriptor(d) for d in raw_layers)
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(f"unsupported layer media type {_short(layer.media_type)}")
    total = sum(layer.size for layer in distinct_layers(layers))
    if total > MAX_BASE_SIZE:
        raise ManifestError(f"the base's layers add up to {total} bytes, over the {MAX_BASE_SIZE} byte limit")
    return config_desc, layers


def distinct_layers(layers: tuple[Descriptor, ...]) -> list[Descriptor]:
    """Each digest once, in the order of first appearance.

    A manifest may list one blob several times (the image then has that layer several
    times), but it is one download, one check and one stored blob.
    """
    seen: dict[str, Descriptor] = {}
    for layer in layers:
        first = seen.setdefault(layer.digest, layer)
        if first.size != layer.size:
            raise ManifestError(f"layer {layer.digest} is listed with sizes {first.size} and {layer.size}")
    return list(seen.values())


def checked_config(config: dict[str, Any], layers: tuple[Descriptor, ...], platform: OciPlatform) -> dict[str, str]:
    """Each layer digest's diff_id, from an untrusted image config that must fit the manifest.

    Also checks the fields that our own image config is built from, so that a base with a
    malformed config is refused here rather than failing every build on top of it.
    """
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers) or not all(
        is_digest(d) for d in diff_ids
    ):
        raise ManifestError("image config's rootfs.diff_ids do not match the manifest's layers")
    if (config.get("os"), config.get("architecture")) != (platform.os, platform.architecture):
        found = f"{str(config.get('os'))[:40]}/{str(config.get('architecture'))[:40]}"
        raise ManifestError(f"image is for {found}, not {platform}")
    by_digest: dict[str, str] = {}
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        if by_digest.setdefault(layer.digest, diff_id) != diff_id:
            raise ManifestError(f"layer {layer.digest} is listed with two different diff_ids")
    _check_settings(config)
    return by_digest


def _check_settings(config: dict[str, Any]) -> None:
    """The fields registry/manifest.image_config copies from a base, with the types it needs."""
    settings = config.get("config")
    if settings is not None and not isinstance(settings, dict):
        raise ManifestError("image config's 'config' is not an object")
    settings = settings or {}
    for key in ("Env", "Entrypoint", "Cmd"):
        value = settings.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ManifestError(f"image config's {key} is not a list of strings")
    labels = settings.get("Labels")
    if labels is not None and not (
        isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())
    ):
        raise ManifestError("image config's Labels do not map strings to strings")
    for key in ("User", "WorkingDir", "StopSignal"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise ManifestError(f"image config's {key} is not a string")
    for key in ("ExposedPorts", "Volumes"):
        if settings.get(key) is not None and not isinstance(settings[key], dict):
            raise ManifestError(f"image config's {key} is not an object")
    if not isinstance(config.get("history", []), list):
        raise ManifestError("image config's history is not a list")


async def _import(
    source: _Source, root: FetchedManifest, platform: OciPlatform, store: Store, layer_budget: int
) -> tuple[BaseImage, dict[str, Any]]:
    manifest = root
    if manifest.media_type in INDEX_TYPES:
        child = _select_platform(_load_json(manifest.data, "index"), platform)
        manifest = await source.get_manifest(child.digest)
    if manifest.media_type not in MANIFEST_TYPES:
        raise ManifestError(f"unsupported manifest type {_short(manifest.media_type)}")
    doc = _load_json(manifest.data, "manifest")
    config_desc, layers = parse_image_manifest(doc, layer_budget)

    config_bytes = await source.get_small_blob(config_desc, MAX_CONFIG_SIZE)
    config = _load_json(config_bytes, "image config")
    diff_id_of = checked_config(config, layers, platform)

    # Stage every distinct layer first: nothing reaches the store unless all of it
    # verified. Each blob is staged once, so the work directory holds each at most once.
    try:
        work = tempfile.TemporaryDirectory(prefix="condery-base-")
    except OSError as exc:
        raise BaseImageError(f"cannot stage the base image's layers: {exc.strerror}") from None
    with work as tmp:
        staged, scans, regzipped = await _stage(source, store, layers, diff_id_of, Path(tmp))
        await store.put_blob_bytes(config_desc.digest, config_bytes)
        for digest, staged_path in staged.items():
            await store.put_blob_file(digest, staged_path)
    for source_digest, gzipped in regzipped.items():  # after their blobs: a record never dangles
        await store.put_record(kinds.BASE_GZIP_LAYERS, _gzip_record_key(source_digest), gzipped.to_json())
    glibc: str | None = None
    accounts: dict[str, str | None] = {}
    for layer in layers:  # in the image's order: the last layer with evidence wins
        glibc = scans[layer.digest].glibc_version or glibc
        accounts.update(scans[layer.digest].accounts)  # a whiteout in a later layer is None

    diff_ids = tuple(diff_id_of[layer.digest] for layer in layers)
    # The config's diff_ids stay as they are: recompression keeps every uncompressed tar.
    layers = tuple(regzipped.get(layer.digest, layer) for layer in layers)
    image = BaseImage(config, layers, diff_ids, glibc, accounts.get("passwd"), accounts.get("group"))
    record = {
        "accounts": {"passwd": image.passwd, "group": image.group},
        "manifest": manifest.digest,
        "config": config_desc.digest,
        "layers": [layer.to_json() for layer in layers],
        "diff_ids": list(diff_ids),
        "glibc": glibc,
    }
    return image, record


async def _stage(
    source: _Source, store: Store, layers: tuple[Descriptor, ...], diff_id_of: Mapping[str, str], directory: Path
) -> tuple[dict[str, Path], dict[str, "LayerScan"], dict[str, Descriptor]]:
    """Fetch (or copy from the store) and scan each distinct layer once.

    Returns the staged files of the blobs the store lacks, every layer's scan, and the
    gzip descriptor of each layer (by source digest) a Docker manifest cannot carry.
    """
    staged: dict[str, Path] = {}
    scans: dict[str, LayerScan] = {}
    regzipped: dict[str, Descriptor] = {}
    unpacked_room = MAX_BASE_UNPACKED_SIZE
    for layer in distinct_layers(layers):
        present = await store.blob_info(layer.digest) is not None
        try:
            path = await (_copy_from_store(store, layer.digest, directory) if present
                          else source.fetch_blob(layer, directory))
        except OSError as exc:  # the work directory (a full /tmp), not the source
            raise BaseImageError(f"cannot stage layer {layer.digest}: {exc.strerror}") from None
        scan = await asyncio.to_thread(scan_layer, path, unpacked_room)
        unpacked_room -= scan.size
        if scan.diff_id != diff_id_of[layer.digest]:
            raise ManifestError(
                f"layer {layer.digest} unpacks to {scan.diff_id}, the config says {diff_id_of[layer.digest]}"
            )
        scans[layer.digest] = scan
        if layer.media_type in REGZIP_TYPES:
            gzipped, gz_path = await _regzip(store, layer, path, scan.diff_id, directory)
            regzipped[layer.digest] = gzipped
            if gz_path is not None:
                staged[gzipped.digest] = gz_path
            path.unlink()  # only the gzip stream is stored and served
        elif present:
            path.unlink()
        else:
            staged[layer.digest] = path
    return staged, scans, regzipped


def _gzip_record_key(source_digest: str) -> str:
    return source_digest.removeprefix("sha256:")


async def _regzip(
    store: Store, layer: Descriptor, path: Path, diff_id: str, directory: Path
) -> tuple[Descriptor, Path | None]:
    """The gzip descriptor of a tar or zstd layer, and its staged file unless stored.

    A recorded recompression whose blob is still stored is reused; otherwise the layer
    is recompressed here (deterministically, so a lost blob comes back the same).
    """
    record = await store.get_record(kinds.BASE_GZIP_LAYERS, _gzip_record_key(layer.digest))
    if record is not None:
        try:
            recorded = parse_descriptor(record)
        except ManifestError:
            recorded = None  # an unreadable record is redone, not trusted
        if recorded is not None and recorded.media_type == OCI_LAYER_GZIP and await store.blob_info(recorded.digest):
            return recorded, None
    out = Path(tempfile.mkstemp(dir=directory, prefix="regzip-")[1])
    try:
        blob = await asyncio.to_thread(gzip_layer, path, out)
    except OSError as exc:
        out.unlink(missing_ok=True)
        raise BaseImageError(f"cannot recompress layer {layer.digest}: {exc.strerror}") from None
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if blob.diff_id != diff_id:  # the stream we will serve must unpack to what the config says
        out.unlink(missing_ok=True)
        raise ManifestError(f"layer {layer.digest} recompressed unpacks to {blob.diff_id}, the config says {diff_id}")
    return Descriptor(OCI_LAYER_GZIP, blob.digest, blob.size), out


@dataclass(frozen=True)
class GzipBlob:
    digest: str  # sha256 of the gzip stream
    size: int
    diff_id: str  # sha256 of what the gzip stream decompresses to


def gzip_layer(source: Path, out_path: Path) -> GzipBlob:
    """Recompress the layer at `source` (tar, gzip or zstd) to deterministic gzip at
    `out_path`, with the compressor of condery's own layers (host-independent bytes).

    The digest and diff_id are read back from the written file, so the diff_id is that
    of the stream a client will unpack, not of what we meant to write.
    """
    with open(source, "rb") as handle, open(out_path, "wb") as raw:
        reader = open_decompressed(handle)
        packed = GzipChunkWriter(raw)  # type: ignore[arg-type]
        try:
            while chunk := reader.read(1 << 20):
                packed.write(chunk)
            packed.close()
        except _STREAM_ERRORS as exc:
            packed.abort()
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the work directory, not the stream
            raise ManifestError(f"layer is not a readable stream: {exc}") from None
        except BaseException:
            packed.abort()
            raise
    return _gzip_digests(out_path)


def _gzip_digests(path: Path) -> GzipBlob:
    compressed, uncompressed, size = hashlib.sha256(), hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            compressed.update(chunk)
            size += len(chunk)
        handle.seek(0)
        # Every gzip member: our layers are several (compression.py); bounded reads.
        with gzip.GzipFile(fileobj=handle, mode="rb") as inflated:
            while chunk := inflated.read(1 << 20):
                uncompressed.update(chunk)
    return GzipBlob("sha256:" + compressed.hexdigest(), size, "sha256:" + uncompressed.hexdigest())


async def _stored_accounts(store: Store, layers: tuple[Descriptor, ...]) -> dict[str, str | None]:
    """etc/passwd and etc/group as the stored layers leave them (the last layer wins)."""
    accounts: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="condery-base-") as tmp:
        for layer in layers:
            path = await _copy_from_store(store, layer.digest, Path(tmp))
            try:
                accounts.update((await asyncio.to_thread(scan_layer, path)).accounts)
            finally:
                path.unlink()
    return accounts


async def _copy_from_store(store: Store, digest: str, directory: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix="stored-")
    with os.fdopen(fd, "wb") as handle:
        async for chunk in store.read_blob(digest):
            await asyncio.to_thread(handle.write, chunk)
    return Path(name)


# -- layer scanning (runs in a worker thread) ----------------------------------------

@dataclass(frozen=True)
class LayerScan:
    diff_id: str  # sha256 of the uncompressed tar
    glibc_version: str | None
    size: int = 0  # bytes of the uncompressed tar
    # "passwd"/"group" -> the layer's etc/passwd or etc/group text, None where it whites it out
    accounts: Mapping[str, str | None] = dataclasses.field(default_factory=dict)


_LIBC_SO = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/]+/)?libc\.so\.6$")
_VERSIONED_LIB = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/]+/)?(?:libc|ld)-(\d+\.\d+)\.so$")
_VERSIONED_TARGET = re.compile(r"(?:^|/)(?:libc|ld)-(\d+\.\d+)\.so$")
_LD_SO = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/]+/)?ld-linux[^/]*\.so\.\d$")
_DPKG_STATUS = re.compile(r"^var/lib/dpkg/(?:status|status\.d/[^/]+)$")
_BANNER = re.compile(rb"GNU C Library [^\n]{0,200}?version (\d+\.\d+)")
_MAX_LIBC_READ = 32 << 20
_MAX_STATUS_READ = 64 << 20
_ACCOUNT_FILES = {"etc/passwd": "passwd", "etc/group": "group"}
# OCI whiteouts that remove them: the file's own, or all of etc below this layer (opaque).
_ACCOUNT_WHITEOUTS = {"etc/.wh.passwd": ("passwd",), "etc/.wh.group": ("group",),
                      "etc/.wh..wh..opq": ("passwd", "group"), ".wh.etc": ("passwd", "group")}
_MAX_ACCOUNTS_READ = 1 << 20  # a passwd of 10,000 users is ~600 KB
# tarfile reads a pax or GNU long-name header whole into memory, however large it says
# it is; real ones are a few hundred bytes (xattrs included).
_MAX_TAR_HEADER = 1 << 20
# What a hostile layer stream can raise besides our own ManifestError: tar, gzip
# (zlib.error is not an OSError), zstd, and a chain of extended headers deep enough to
# exhaust the recursion tarfile reads them with.
_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, zstandard.ZstdError, RecursionError)


class _BoundedTarInfo(tarfile.TarInfo):
    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)
        if self.type in extended and self.size > _MAX_TAR_HEADER:
            raise ManifestError(f"layer has a {self.size} byte extended tar header")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class _HashingReader:
    """A read-only stream that hashes what passes through it, up to `limit` bytes."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw = raw
        self.hasher = hashlib.sha256()
        self.size = 0
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.size += len(data)
        if self.size > self.limit:
            raise ManifestError(f"the base image unpacks to more than {MAX_BASE_UNPACKED_SIZE} bytes")
        self.hasher.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return "sha256:" + self.hasher.hexdigest()


def _dpkg_libc6_version(text: str) -> str | None:
    for stanza in text.split("\n\n"):
        fields = dict(
            line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith(" ")
        )
        if fields.get("Package", "").strip() == "libc6" and "installed" in fields.get("Status", "installed"):
            match = re.match(r"^(?:\d+:)?(\d+\.\d+)", fields.get("Version", "").strip())
            if match:
                return match.group(1)
    return None


def scan_layer(path: Path, limit: int = MAX_BASE_UNPACKED_SIZE) -> LayerScan:
    """Hash a layer's uncompressed tar (at most `limit` bytes of it) and look for the
    glibc version it carries. Anything unreadable is a ManifestError."""
    dpkg = banner = filename = None
    accounts: dict[str, str | None] = {}
    with open(path, "rb") as handle:
        reader = _HashingReader(open_decompressed(handle), limit)
        try:
            with tarfile.open(fileobj=reader, mode="r|", tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]
                for member in tar:
                    name = member.name.lstrip("/").removeprefix("./")
                    if member.isfile() and _DPKG_STATUS.match(name) and member.size <= _MAX_STATUS_READ:
                        text = _read_member(tar, member).decode("utf-8", "replace")
                        dpkg = _dpkg_libc6_version(text) or dpkg
                    elif _LIBC_SO.match(name) and member.isfile() and member.size <= _MAX_LIBC_READ:
                        found = _BANNER.search(_read_member(tar, member))
                        banner = found.group(1).decode() if found else banner
                    elif (versioned := _VERSIONED_LIB.match(name)) and member.isfile():
                        filename = versioned.group(1)
                    elif (_LIBC_SO.match(name) or _LD_SO.match(name)) and member.issym():
                        target = _VERSIONED_TARGET.search(member.linkname)
                        filename = target.group(1) if target else filename
                    elif name in _ACCOUNT_FILES:
                        # This layer's file replaces the lower layers'; one we will not read
                        # (a link, or over the bound) counts as absent, never as theirs.
                        readable = member.isfile() and member.size <= _MAX_ACCOUNTS_READ
                        accounts[_ACCOUNT_FILES[name]] = (
                            _read_member(tar, member).decode("utf-8", "replace") if readable else None)
                    elif name in _ACCOUNT_WHITEOUTS:
                        for kind in _ACCOUNT_WHITEOUTS[name]:  # hides lower layers' only, not this one's
                            accounts.setdefault(kind, None)
            diff_id = reader.drain()
        except ManifestError:
            raise
        except _STREAM_ERRORS as exc:
            raise ManifestError(f"layer is not a readable tar stream: {exc}") from None
    return LayerScan(diff_id, dpkg or banner or filename, reader.size, accounts)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    extracted = tar.extractfile(member)
    return extracted.read() if extracted is not None else b""
