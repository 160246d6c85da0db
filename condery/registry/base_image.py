"""The base image under every conda image: fetched, verified, stored, remembered.

Spec forms (configuration key `base_image`):
- `REGISTRY/REPO:TAG@sha256:<digest>` or `REGISTRY/REPO@sha256:<digest>`: pinned;
- `REGISTRY/REPO:TAG`: resolved once, then the stored answer is reused;
- `oci:PATH[:TAG]`: a local OCI image layout (read on every resolve, it is local and
  small; the layer work is cached by the manifest's digest);
- `scratch`: no base at all.

Every blob is verified against its digest and size before it is stored, layers are
also checked against the config's diff_ids while they are decompressed, and nothing is
stored unless the whole image verified. The result is recorded under the record kind
`base-images`, so later resolves make no network call.

glibc detection (for the solver's `__glibc` virtual package) reads each layer's tar
stream once, in order, and the last layer with evidence wins. Evidence, strongest first:
the dpkg record of `libc6` (`var/lib/dpkg/status` or distroless `status.d/`), the
"GNU C Library ... version X.Y" banner inside `libc.so.6`, and a versioned file name
`libc-X.Y.so` / `ld-X.Y.so` (glibc before 2.34). None when nothing is found (musl,
scratch, busybox).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping, Protocol

import aiohttp

from condery.registry.media_types import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from condery.registry.manifest import (
    LAYER_TYPES,
    Descriptor,
    ManifestError,
    parse_descriptor,
)
from condery.registry.platforms import OciPlatform
from condery.registry.upstream import (
    MAX_MANIFEST_SIZE,
    FetchedManifest,
    ImageReference,
    UpstreamClient,
    UpstreamError,
)
from condery.storage import Store

RECORD_KIND = "base-images"
MAX_CONFIG_SIZE = 8 << 20
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_REF_NAME = "org.opencontainers.image.ref.name"


class BaseImageError(RuntimeError):
    """The base image cannot be used: bad spec, unreachable, or it failed verification."""


@dataclass(frozen=True)
class BaseImage:
    config: Mapping[str, Any] | None  # the base image config JSON (None for scratch)
    layers: tuple[Descriptor, ...]  # blobs present in the store, digests verified
    diff_ids: tuple[str, ...]
    glibc_version: str | None  # e.g. "2.36"; None when the base has no glibc we can see


SCRATCH = BaseImage(config=None, layers=(), diff_ids=(), glibc_version=None)


async def resolve_base_image(
    spec: str, platform: OciPlatform, store: Store, session: aiohttp.ClientSession
) -> BaseImage:
    spec = spec.strip()
    if spec == "scratch":
        return SCRATCH
    source: _Source
    if spec.startswith("oci:"):
        layout = _Layout.from_spec(spec[len("oci:") :])
        # A layout can change under the same path: key the work by what it holds now.
        layout_root = await asyncio.to_thread(layout.root_manifest)
        key = _record_key(f"oci-manifest:{layout_root.digest}", platform)
        root: FetchedManifest | None = layout_root
        source, reference = layout, layout_root.digest
    else:
        try:
            ref = ImageReference.parse(spec)
        except ValueError as exc:
            raise BaseImageError(f"base_image {spec!r}: {exc}") from None
        # An unpinned tag is resolved once: its record answers until someone removes it.
        root, key = None, _record_key(str(ref), platform)
        source, reference = _Registry(UpstreamClient(session), ref), ref.digest or ref.tag or "latest"

    cached = await _from_record(store, key)
    if cached is not None:
        return cached
    try:
        if root is None:
            root = await source.get_manifest(reference)
        image, record = await _import(source, root, platform, store)
    except (UpstreamError, ManifestError) as exc:
        raise BaseImageError(f"base image {spec}: {exc}") from exc
    record["spec"] = spec
    await store.put_record(RECORD_KIND, key, record)
    return image


def _record_key(text: str, platform: OciPlatform) -> str:
    slug = "-".join(p for p in (platform.os, platform.architecture, platform.variant) if p)
    return f"{slug}/{hashlib.sha256(text.encode()).hexdigest()}"


async def _from_record(store: Store, key: str) -> BaseImage | None:
    """The recorded image, if its record is sound and all its blobs are still stored."""
    record = await store.get_record(RECORD_KIND, key)
    if record is None:
        return None
    try:
        layers = tuple(parse_descriptor(d) for d in record["layers"])
        diff_ids = tuple(record["diff_ids"])
        config_digest = record["config"]
        glibc = record.get("glibc")
    except (KeyError, TypeError, ManifestError):
        return None  # an unreadable record is rebuilt, not trusted
    for digest in (config_digest, *(layer.digest for layer in layers)):
        if not isinstance(digest, str) or await store.blob_info(digest) is None:
            return None
    config = json.loads(await store.get_blob_bytes(config_digest))
    return BaseImage(config, layers, diff_ids, glibc if isinstance(glibc, str) else None)


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
        if sep and _TAG_RE.match(tail) and not (Path(text) / "index.json").is_file():
            path, tag = Path(head), tail
        else:
            path, tag = Path(text), None
        if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
            raise BaseImageError(f"oci:{path}: not an OCI image layout (no oci-layout / index.json)")
        return cls(path, tag)

    def _blob_path(self, digest: str) -> Path:
        if not _DIGEST_RE.match(digest):  # keeps the path inside blobs/sha256/
            raise ManifestError(f"not a sha256 digest: {digest!r}")
        return self.path / "blobs" / "sha256" / digest.split(":", 1)[1]

    def _read(self, path: Path, limit: int) -> bytes:
        try:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
        except OSError as exc:
            raise BaseImageError(f"oci:{self.path}: cannot read {path.name}: {exc.strerror}") from None
        if len(data) > limit:
            raise BaseImageError(f"oci:{self.path}: {path.name} is over the {limit} byte limit")
        return data

    def root_manifest(self) -> FetchedManifest:
        """The manifest or index that index.json names for our tag."""
        try:
            index = json.loads(self._read(self.path / "index.json", MAX_MANIFEST_SIZE))
            entries = [parse_descriptor(e) for e in index["manifests"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise BaseImageError(f"oci:{self.path}: malformed index.json ({exc})") from None
        if self.tag is not None:
            chosen = [e for e in entries if (e.annotations or {}).get(_REF_NAME) == self.tag]
        elif len(entries) == 1:
            chosen = entries
        else:
            chosen = [e for e in entries if (e.annotations or {}).get(_REF_NAME) == "latest"]
        if len(chosen) != 1:
            names = sorted({(e.annotations or {}).get(_REF_NAME, "?") for e in entries})
            raise BaseImageError(
                f"oci:{self.path}: no single image tagged {self.tag or 'latest'} (tags: {', '.join(names)})"
            )
        return self._manifest(chosen[0].digest)

    def _manifest(self, digest: str) -> FetchedManifest:
        data = self._read(self._blob_path(digest), MAX_MANIFEST_SIZE)
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
        data = await asyncio.to_thread(self._read, self._blob_path(desc.digest), desc.size)
        _check_bytes(data, desc.digest, desc.size)
        return data

    async def fetch_blob(self, desc: Descriptor, directory: Path) -> Path:
        return await asyncio.to_thread(self._copy_blob, desc, directory)

    def _copy_blob(self, desc: Descriptor, directory: Path) -> Path:
        fd, name = tempfile.mkstemp(dir=directory, prefix="layout-")
        hasher, copied = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, open(self._blob_path(desc.digest), "rb") as src:
                while chunk := src.read(1 << 20):
                    copied += len(chunk)
                    if copied > desc.size:
                        break
                    hasher.update(chunk)
                    out.write(chunk)
            if copied != desc.size or "sha256:" + hasher.hexdigest() != desc.digest:
                raise ManifestError(f"oci:{self.path}: blob {desc.digest} does not match its digest or size")
        except OSError as exc:
            Path(name).unlink(missing_ok=True)
            raise BaseImageError(f"oci:{self.path}: blob {desc.digest}: {exc.strerror}") from None
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)


def _check_bytes(data: bytes, digest: str, size: int | None) -> None:
    if size is not None and len(data) != size:
        raise ManifestError(f"blob {digest} has {len(data)} bytes, expected {size}")
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ManifestError(f"blob {digest} does not match its digest")


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
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


async def _import(
    source: _Source, root: FetchedManifest, platform: OciPlatform, store: Store
) -> tuple[BaseImage, dict[str, Any]]:
    manifest = root
    if manifest.media_type in INDEX_TYPES:
        child = _select_platform(_load_json(manifest.data, "index"), platform)
        manifest = await source.get_manifest(child.digest)
    if manifest.media_type not in MANIFEST_TYPES:
        raise ManifestError(f"unsupported manifest type {manifest.media_type!r}")
    doc = _load_json(manifest.data, "manifest")
    config_desc = parse_descriptor(doc.get("config"))
    if config_desc.media_type not in CONFIG_TYPES:
        raise ManifestError(f"config media type {config_desc.media_type!r} is not an image config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ManifestError("manifest has no layers list")
    layers = tuple(parse_descriptor(d) for d in raw_layers)
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(f"unsupported layer media type {layer.media_type!r}")

    config_bytes = await source.get_small_blob(config_desc, MAX_CONFIG_SIZE)
    config = _load_json(config_bytes, "image config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers) or not all(
        isinstance(d, str) and _DIGEST_RE.match(d) for d in diff_ids
    ):
        raise ManifestError("image config's rootfs.diff_ids do not match the manifest's layers")
    if (config.get("os"), config.get("architecture")) != (platform.os, platform.architecture):
        raise ManifestError(
            f"image is for {config.get('os')}/{config.get('architecture')}, not {platform}"
        )

    # Stage every layer first: nothing reaches the store unless all of it verified.
    with tempfile.TemporaryDirectory(prefix="condery-base-") as tmp:
        staged: list[Path | None] = []
        glibc: str | None = None
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            present = await store.blob_info(layer.digest) is not None
            path = await (_copy_from_store(store, layer.digest, Path(tmp)) if present
                          else source.fetch_blob(layer, Path(tmp)))
            scan = await asyncio.to_thread(scan_layer, path)
            if scan.diff_id != diff_id:
                raise ManifestError(f"layer {layer.digest} unpacks to {scan.diff_id}, the config says {diff_id}")
            glibc = scan.glibc_version or glibc
            if present:
                path.unlink()
            staged.append(None if present else path)
        await store.put_blob_bytes(config_desc.digest, config_bytes)
        for layer, staged_path in zip(layers, staged, strict=True):
            if staged_path is not None:
                await store.put_blob_file(layer.digest, staged_path)

    image = BaseImage(config, layers, tuple(diff_ids), glibc)
    record = {
        "manifest": manifest.digest,
        "config": config_desc.digest,
        "layers": [layer.to_json() for layer in layers],
        "diff_ids": list(diff_ids),
        "glibc": glibc,
    }
    return image, record


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


_LIBC_SO = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/]+/)?libc\.so\.6$")
_VERSIONED_LIB = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/]+/)?(?:libc|ld)-(\d+\.\d+)\.so$")
_VERSIONED_TARGET = re.compile(r"(?:^|/)(?:libc|ld)-(\d+\.\d+)\.so$")
_LD_SO = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/]+/)?ld-linux[^/]*\.so\.\d$")
_DPKG_STATUS = re.compile(r"^var/lib/dpkg/(?:status|status\.d/[^/]+)$")
_BANNER = re.compile(rb"GNU C Library [^\n]{0,200}?version (\d+\.\d+)")
_MAX_LIBC_READ = 32 << 20
_MAX_STATUS_READ = 64 << 20


class _HashingReader:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hasher.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return "sha256:" + self.hasher.hexdigest()


def _decompressed(handle: IO[bytes]) -> IO[bytes]:
    magic = handle.read(4)
    handle.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raise ManifestError("zstd-compressed base layers need the 'zstandard' package") from None
        return zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True)  # type: ignore[return-value]
    return handle  # an uncompressed tar


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


def scan_layer(path: Path) -> LayerScan:
    """Hash a layer's uncompressed tar and look for the glibc version it carries."""
    dpkg = banner = filename = None
    with open(path, "rb") as handle:
        reader = _HashingReader(_decompressed(handle))
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
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
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise ManifestError(f"layer is not a readable tar stream: {exc}") from None
        diff_id = reader.drain()
    return LayerScan(diff_id, dpkg or banner or filename)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    extracted = tar.extractfile(member)
    return extracted.read() if extracted is not None else b""
