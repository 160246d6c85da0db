"""Storage: blobs by digest and small JSON records, behind one interface.

Two kinds of things are stored:
- blobs, content-addressed (`sha256:<hex>`): layers, image configs, manifests;
- records, small JSON documents under a (kind, key) pair: layer cache entries by
  package key, manifest records by canonical name/tag/platform, base image records.

Every write is atomic: a reader sees a whole blob or none, never a part, and a failed
write leaves nothing behind (no temporary file, no partial object). Blobs are written
from a local file that the caller already hashed; the store does not re-hash on the way
in, so callers must only put what they verified. What is already stored may still rot
(a disk error, a truncated copy, an operator's mistake): backends that hold the bytes
themselves check a blob against its digest the first time a process reads it, and
`verify_blob` checks one on demand (`condery verify`).

StorageError messages reach clients and logs: they say what failed and why ("cannot
store blob sha256:...: no space left on device"), never a server path or a secret.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO

from condery.oci.grammar import is_digest

log = logging.getLogger("condery.storage")
RECORD_KEY_RE = re.compile(r"^[A-Za-z0-9._@:+=,-]+(/[A-Za-z0-9._@:+=,-]+)*$")


class StorageError(RuntimeError):
    """The backend failed (I/O, network); the request may be retried.

    `errno` is set when a local OSError caused it, so that callers can say "the store
    is out of space" rather than just "storage failed".
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# OSErrors that mean "the disk under the store or the work directory is in trouble",
# a passing fault for the operator to fix, not a fault of the package being built.
STORE_FAULT_REASONS: dict[int, str] = {
    errno.ENOSPC: "the store is out of space",
    errno.EDQUOT: "the store is out of space (quota exceeded)",
    errno.EIO: "the store had an I/O error",
    errno.EROFS: "the store is read-only",
}


def store_fault_reason(exc: BaseException) -> str | None:
    """What a disk fault means for the registry's user, or None if `exc` is not one.

    Looks at `exc` and the exceptions it was raised from, since builders wrap OSErrors
    (a package install failing with ENOSPC is still a full disk, not a bad package).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "errno", None)
        if isinstance(current, (OSError, StorageError)) and code in STORE_FAULT_REASONS:
            return STORE_FAULT_REASONS[code]
        current = current.__cause__ or current.__context__
    return None


def os_error_text(exc: OSError) -> str:
    """An OSError's reason without the file name it carries ("no space left on device")."""
    return (exc.strerror or type(exc).__name__).lower()


def check_digest(digest: str) -> str:
    """Return `digest` if it is a well-formed sha256 digest, else raise ValueError."""
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest


def check_record_key(key: str) -> str:
    """Keys become paths (filesystem) or object names (S3): no '..', no empty parts."""
    if not RECORD_KEY_RE.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid record key: {key!r}")
    return key


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int


@dataclass(frozen=True)
class Listed:
    """A stored blob or record as a listing gives it: for gc, which sweeps by age."""

    name: str  # a blob's digest, or a record's key
    modified: float  # wall clock of its last write
    size: int


class Store(abc.ABC):
    """The storage interface. All methods are coroutines; I/O stays off the event loop."""

    # -- blobs ---------------------------------------------------------------
    @abc.abstractmethod
    async def blob_info(self, digest: str) -> BlobInfo | None:
        """Size of a stored blob, or None when it is not stored."""

    async def has_blob(self, digest: str, size: int) -> bool:
        """Whether the blob is stored whole: present, with the `size` its descriptor gives.

        A stored blob of another size cannot match its digest (a truncated copy, an
        interrupted restore): it is removed, as a corrupt blob found by hashing is, so
        that every record pointing at it reads as a miss and the next request makes it
        again. A stat, not a hash: cheap enough to check every blob of an image before
        its manifest is first served; bit rot of the same size is caught when the blob
        is first read (filesystem) or by `condery verify`.
        """
        info = await self.blob_info(digest)
        if info is None:
            return False
        if info.size == size:
            return True
        log.error("blob %s has %d bytes where %d were stored; removing it so it is made again",
                  digest, info.size, size)
        await self.remove_blob(digest)
        return False

    @abc.abstractmethod
    def read_blob(
        self, digest: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Stream bytes [offset, offset+length) of a blob. Raises KeyError if absent."""

    async def open_blob_file(self, digest: str) -> BinaryIO | None:
        """The blob as an open local file, checked like read_blob checks it, for serving
        without copying it through the process (sendfile); None when the backend holds
        no local file. The caller closes it. Raises KeyError if absent."""
        return None

    @abc.abstractmethod
    async def put_blob_file(self, digest: str, path: Path) -> None:
        """Store the file at `path` (already hashed to `digest`) atomically.

        The file may be moved or removed by this call. Storing an existing digest is a
        no-op (content addressing makes it the same bytes).
        """

    async def put_blob_bytes(self, digest: str, data: bytes) -> None:
        """Store a small blob (configs, manifests) held in memory."""
        await self._put_small_blob(digest, data)

    @abc.abstractmethod
    async def _put_small_blob(self, digest: str, data: bytes) -> None: ...

    async def get_blob_bytes(self, digest: str) -> bytes:
        """Read a small blob whole. Raises KeyError if absent."""
        return b"".join([chunk async for chunk in self.read_blob(digest)])

    async def blob_redirect_url(self, digest: str) -> str | None:
        """A URL the client may fetch the blob from directly (S3 presigned), or None."""
        return None

    # Bumped by every remove_blob of this process: whoever caches "this image's blobs are
    # all present" (the builder) checks again once it moves.
    removal_generation: int = 0

    @abc.abstractmethod
    async def remove_blob(self, digest: str) -> None:
        """Remove a blob (a corrupt one); removing an absent blob is a no-op.

        Implementations bump `removal_generation`."""

    async def list_blobs(self) -> AsyncIterator[str]:
        """The digests of every stored blob, in no particular order."""
        async for entry in self.list_blob_entries():
            yield entry.name

    @abc.abstractmethod
    def list_blob_entries(self) -> AsyncIterator[Listed]:
        """Every stored blob with its write time and size (one listing, no per-blob request)."""

    async def verify_blob(self, digest: str) -> bool:
        """Whether the stored bytes hash to `digest` (reads the whole blob).

        Raises KeyError if the blob is absent.
        """
        hasher = hashlib.sha256()
        async for chunk in self.read_blob(digest):
            hasher.update(chunk)
        return "sha256:" + hasher.hexdigest() == digest

    # -- crash litter ----------------------------------------------------------
    async def clean_staging(self, max_age: float) -> int:
        """Remove what crashed writers left behind, untouched for `max_age` seconds.

        Called at start-up. Other replicas may share the store and be writing right
        now, so only entries older than any live write can be are removed. Returns how
        many entries were removed.
        """
        return 0

    # -- records -------------------------------------------------------------
    @abc.abstractmethod
    async def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        """A JSON record, or None when absent."""

    @abc.abstractmethod
    async def put_record(self, kind: str, key: str, value: dict[str, Any]) -> None:
        """Write a JSON record atomically (last writer wins)."""

    @abc.abstractmethod
    async def list_records(self, kind: str, prefix: str = "") -> list[str]:
        """Keys of the records of `kind` whose key starts with `prefix`, sorted."""

    @abc.abstractmethod
    async def list_record_entries(self, kind: str) -> list[Listed]:
        """Every record of `kind` with its write time and size."""

    @abc.abstractmethod
    async def remove_record(self, kind: str, key: str) -> None:
        """Remove a record (gc); removing an absent record is a no-op."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return when the store answers and takes writes, else raise StorageError.

        For /readyz: cheap (one tiny write, or one request), and its message says what
        is wrong without a path or a credential.
        """

    async def close(self) -> None:
        """Release connections; the store is not used after this."""
