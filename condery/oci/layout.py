"""OCI image layouts: reading one (an `oci:` base image) and writing one (`condery build`).

A layout read is as untrusted as an upstream registry: its index, manifests and blobs
are bounded in size, checked against their digests, opened only as regular files
(a FIFO or a device planted as a blob is refused) and named by digest only, so no path
outside `blobs/sha256/` is ever read. Messages never carry the layout's path: it is the
operator's business, not a client's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, AsyncIterator, Protocol

from condery.oci.grammar import is_digest, is_tag
from condery.oci.manifest import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    FetchedManifest,
    ManifestError,
    check_bytes,
    manifest_json,
    parse_descriptor,
)
from condery.oci.media_types import OCI_INDEX, OCI_MANIFEST
from condery.oci.references import walk

REF_NAME = "org.opencontainers.image.ref.name"


class LayoutError(RuntimeError):
    """The layout cannot be read: not a layout, an unreadable or oversized file, no such tag."""


def split_spec(text: str) -> tuple[Path, str | None]:
    """`DIR[:TAG]` of an `oci:` spec: "DIR:TAG" unless DIR:TAG is itself the layout directory."""
    head, sep, tail = text.rpartition(":")
    if sep and is_tag(tail) and not (Path(text) / "index.json").is_file():
        return Path(head), tail
    return Path(text), None


@dataclass(frozen=True)
class OciLayout:
    """A local OCI image layout; its files are as untrusted as an upstream's."""

    path: Path
    tag: str | None

    @classmethod
    def from_spec(cls, text: str) -> "OciLayout":
        if not text:
            raise LayoutError("oci: needs a path to an OCI image layout")
        path, tag = split_spec(text)
        if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
            raise LayoutError("not an OCI image layout (no oci-layout / index.json)")
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
            raise LayoutError(f"cannot read {what}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise LayoutError(f"{what} is not a regular file")
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def _read(self, path: Path, limit: int, what: str) -> bytes:
        with self._open(path, what) as handle:
            try:
                data = handle.read(limit + 1)
            except OSError as exc:
                raise LayoutError(f"cannot read {what}: {exc.strerror}") from None
        if len(data) > limit:
            raise LayoutError(f"{what} is over the {limit} byte limit")
        return data

    def root_manifest(self) -> FetchedManifest:
        """The manifest or index that index.json names for our tag."""
        try:
            index = json.loads(self._read(self.path / "index.json", MAX_MANIFEST_SIZE, "index.json"))
            entries = [parse_descriptor(e) for e in index["manifests"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise LayoutError(f"malformed index.json ({exc})") from None
        if self.tag is not None:
            chosen = [e for e in entries if (e.annotations or {}).get(REF_NAME) == self.tag]
        elif len(entries) == 1:
            chosen = entries
        else:
            chosen = [e for e in entries if (e.annotations or {}).get(REF_NAME) == "latest"]
        if len(chosen) != 1:
            names = sorted({(e.annotations or {}).get(REF_NAME, "?") for e in entries})
            raise LayoutError(f"no single image tagged {self.tag or 'latest'} (tags: {', '.join(names)})")
        return self._manifest(chosen[0].digest)

    def _manifest(self, digest: str) -> FetchedManifest:
        data = self._read(self._blob_path(digest), MAX_MANIFEST_SIZE, f"manifest {digest}")
        check_bytes(data, digest, None)
        doc = manifest_json(data, f"manifest {digest}")
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
        check_bytes(data, desc.digest, desc.size)
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
            raise LayoutError(f"blob {desc.digest}: {exc.strerror}") from None
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)



class BlobSource(Protocol):
    """What the writer reads an image from (a Store is one)."""

    async def blob_info(self, digest: str) -> object | None: ...

    def read_blob(self, digest: str) -> AsyncIterator[bytes]: ...


async def write_oci_layout(store: BlobSource, digest: str, media_type: str, size: int, tag: str, out_dir: Path) -> None:
    """Copy a manifest (or index) and every blob it reaches into the layout at out_dir.

    An existing layout is extended: blobs are content-addressed, and the tag's entry in
    index.json is replaced.
    """
    blobs = out_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (out_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    async def copied(digest: str) -> bytes:  # a manifest or an index: small
        return (await _copy_blob(store, digest, blobs)).read_bytes()

    async for visit in walk([digest], copied):
        if visit.found is None:
            raise KeyError(f"manifest {visit.digest} is {'missing from the store' if visit.missing else 'unreadable'}")
        for blob in visit.found.blobs:
            await _copy_blob(store, blob.digest, blobs)

    index_path = out_dir / "index.json"
    index: dict[str, Any] = (json.loads(index_path.read_text()) if index_path.exists()
                             else {"schemaVersion": 2, "manifests": []})
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    index["manifests"].append(
        {
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {REF_NAME: tag},
        }
    )
    index.setdefault("mediaType", "application/vnd.oci.image.index.v1+json")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".index-")
    with os.fdopen(fd, "w") as handle:
        json.dump(index, handle, indent=2)
    os.replace(tmp, index_path)


async def _copy_blob(store: BlobSource, digest: str, blobs: Path) -> Path:
    """Copy one blob into the layout (once: blobs are content-addressed); its path there."""
    target = blobs / digest.split(":", 1)[1]
    if target.exists():
        return target
    if await store.blob_info(digest) is None:
        raise KeyError(f"blob {digest} is missing from the store")
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".blob-")
    with os.fdopen(fd, "wb") as handle:
        async for chunk in store.read_blob(digest):
            handle.write(chunk)
    os.replace(tmp, target)
    return target
