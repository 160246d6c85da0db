"""The embedded default store: a directory tree.

    ROOT/blobs/sha256/<hex>          content-addressed blobs
    ROOT/records/<kind>/<key>.json   JSON records
    ROOT/tmp/                        staging for atomic writes (same filesystem)

Atomicity comes from writing under ROOT/tmp and `os.replace`-ing into place, so a crash
leaves at worst an orphan in tmp/, never a partial blob or record; a failed write
removes its own staged file, and start-up removes orphans once they are stale.
Durability: a blob's bytes are fsynced before the rename that publishes it, and the
directory after, so a power cut cannot leave a published name over missing bytes.

Integrity: a blob is hashed the first time this process reads it (unless this process
wrote it), before any byte is served; one that does not match its digest is removed
and reported absent, so that the builder, which treats a missing blob as a cache miss,
builds it again. Hashing before serving rather than while streaming costs one extra
read per blob per process, but catches corruption before a client has received a
status line, and covers Range requests, which never read a whole blob.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Callable, TypeVar

from condery.common.jsonobject import json_object
from condery.common.singleflight import SingleFlight
from condery.storage import (
    BlobInfo,
    Listed,
    StorageError,
    Store,
    check_digest,
    check_record_key,
    os_error_text,
    store_fault_reason,
)
from condery.storage.litter import remove_stale

log = logging.getLogger("condery.storage")
_HASH_CHUNK = 1 << 20
_T = TypeVar("_T")

# Durable writes wait on the disk (fsync), not on a core: they get threads of their own,
# so that a build's hundreds of them (a blob and a record per layer, each fsynced with its
# directory) never hold the event loop's default executor, whose few threads (cpu + 4)
# the CPU-bound steps of the same build need. py-spy on a cold build of 300 small
# packages: half of that executor's busy samples were fsyncs.
_WRITE_THREADS = 8
_writers_lock = threading.Lock()
_writers: ThreadPoolExecutor | None = None


async def _durably(fn: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking write (fsyncs included) on the process-wide writer threads."""
    global _writers
    with _writers_lock:
        if _writers is None:
            _writers = ThreadPoolExecutor(max_workers=_WRITE_THREADS, thread_name_prefix="condery-store")
    return await asyncio.get_running_loop().run_in_executor(_writers, functools.partial(fn, *args))


class FilesystemStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.tmp = self.root / "tmp"
        for sub in ("blobs/sha256", "records", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Digests whose bytes this process wrote or hashed: trusted without hashing again.
        self._verified: set[str] = set()
        self._verifying: SingleFlight[bool] = SingleFlight()

    def _blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / check_digest(digest).split(":", 1)[1]

    def _record_path(self, kind: str, key: str) -> Path:
        check_record_key(kind)
        return self.root / "records" / kind / (check_record_key(key) + ".json")

    def staging_dir(self) -> Path:
        """A directory on the store's filesystem, so staged files can be renamed in."""
        return self.tmp

    async def blob_info(self, digest: str) -> BlobInfo | None:
        try:
            return BlobInfo(digest, self._blob_path(digest).stat().st_size)
        except FileNotFoundError:
            return None

    async def open_blob_file(self, digest: str) -> BinaryIO:
        path = self._blob_path(digest)
        if digest not in self._verified and not await self._verified_once(digest):
            raise KeyError(digest)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise KeyError(digest) from None

    async def read_blob(
        self, digest: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        with await self.open_blob_file(digest) as handle:
            handle.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                size = chunk_size if remaining is None else min(chunk_size, remaining)
                chunk = await asyncio.to_thread(handle.read, size)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    async def _verified_once(self, digest: str) -> bool:
        """Hash a blob not yet trusted by this process; remove it if it is corrupt.

        One hash per digest however many requests ask at once (single flight).
        """

        async def check() -> bool:
            path = self._blob_path(digest)
            try:
                actual = await asyncio.to_thread(_hash_file, path)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise StorageError(f"cannot read blob {digest}: {os_error_text(exc)}", exc.errno) from exc
            if actual == digest:
                self._verified.add(digest)
                return True
            log.error("blob %s is corrupt (its bytes hash to %s); removing it so it is built again", digest, actual)
            await self.remove_blob(digest)
            return False

        return await self._verifying.run(digest, check)

    async def verify_blob(self, digest: str) -> bool:
        try:
            actual = await asyncio.to_thread(_hash_file, self._blob_path(digest))
        except FileNotFoundError:
            raise KeyError(digest) from None
        except OSError as exc:
            raise StorageError(f"cannot read blob {digest}: {os_error_text(exc)}", exc.errno) from exc
        if actual == digest:
            self._verified.add(digest)
        return actual == digest

    async def remove_blob(self, digest: str) -> None:
        self._verified.discard(digest)
        self.removal_generation += 1
        try:
            await asyncio.to_thread(self._blob_path(digest).unlink, missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot remove blob {digest}: {os_error_text(exc)}", exc.errno) from exc

    async def list_blob_entries(self) -> AsyncIterator[Listed]:
        base = self.root / "blobs" / "sha256"

        def scan() -> list[Listed]:
            found = []
            with os.scandir(base) as entries:
                for entry in entries:
                    try:
                        digest, stat = check_digest("sha256:" + entry.name), entry.stat()
                    except (ValueError, FileNotFoundError):
                        continue  # a stray file, or removed since the listing
                    found.append(Listed(digest, stat.st_mtime, stat.st_size))
            return found

        for listed in await asyncio.to_thread(scan):
            yield listed

    async def put_blob_file(self, digest: str, path: Path) -> None:
        """Move (or copy) `path` in; the file is gone afterwards, whether this worked or not.

        Removing it on failure too is what keeps a full disk from also filling up with
        the staged layers of every failed build.
        """
        target = self._blob_path(digest)
        try:
            # A stored copy this process has not hashed may be the corrupt one being
            # rebuilt: replace it (atomically; the caller's bytes were hashed).
            if digest in self._verified and target.exists():
                return
            await _durably(self._move_in, Path(path), target, digest)
            self._verified.add(digest)  # the caller hashed it; we fsynced it
        finally:
            Path(path).unlink(missing_ok=True)

    def _move_in(self, source: Path, target: Path, digest: str) -> None:
        staged: str | None = None
        try:
            if source.stat().st_dev == self.tmp.stat().st_dev:
                _fsync_file(source)
                os.replace(source, target)
            else:
                fd, staged = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
                os.close(fd)
                shutil.copyfile(source, staged)
                _fsync_file(Path(staged))
                os.replace(staged, target)
                staged = None
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot store blob {digest}: {os_error_text(exc)}", exc.errno) from exc
        finally:
            if staged is not None:
                Path(staged).unlink(missing_ok=True)

    async def _put_small_blob(self, digest: str, data: bytes) -> None:
        target = self._blob_path(digest)
        if digest not in self._verified or not target.exists():
            await _durably(self._write_atomic, target, data, f"blob {digest}")
            self._verified.add(digest)

    def _write_atomic(self, target: Path, data: bytes, what: str) -> None:
        staged: str | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, staged = tempfile.mkstemp(dir=self.tmp, prefix="w-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staged, target)
            staged = None
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot store {what}: {os_error_text(exc)}", exc.errno) from exc
        finally:
            if staged is not None:
                Path(staged).unlink(missing_ok=True)

    async def ping(self) -> None:
        await asyncio.to_thread(self._probe)

    def _probe(self) -> None:
        # A write in the staging directory, where every blob write starts: a read-only
        # or full disk, or a removed store directory, fails here as it would on a build.
        try:
            fd, name = tempfile.mkstemp(dir=self.tmp, prefix="ping-")
            try:
                os.write(fd, b"ping")
            finally:
                os.close(fd)
                Path(name).unlink(missing_ok=True)
        except OSError as exc:
            reason = store_fault_reason(exc) or f"the store cannot be written ({os_error_text(exc)})"
            raise StorageError(reason, exc.errno) from exc

    async def clean_staging(self, max_age: float) -> int:
        return await asyncio.to_thread(remove_stale, self.tmp, max_age)

    async def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self._record_path(kind, key)
        try:
            text = await asyncio.to_thread(path.read_text)
        except FileNotFoundError:
            return None
        value = json_object(text)
        if value is None:  # as the S3 backend answers: a store fault, not a 500
            raise StorageError(f"record {kind}/{key} is not a JSON object")
        return value

    async def put_record(self, kind: str, key: str, value: dict[str, Any]) -> None:
        data = json.dumps(value, sort_keys=True).encode()
        await _durably(self._write_atomic, self._record_path(kind, key), data, f"record {kind}/{key}")

    async def list_records(self, kind: str, prefix: str = "") -> list[str]:
        base = self.root / "records" / check_record_key(kind)

        def scan() -> list[str]:
            if not base.is_dir():
                return []
            keys = []
            for path in base.rglob("*.json"):
                key = path.relative_to(base).as_posix()[: -len(".json")]
                if key.startswith(prefix):
                    keys.append(key)
            return sorted(keys)

        return await asyncio.to_thread(scan)

    async def list_record_entries(self, kind: str) -> list[Listed]:
        base = self.root / "records" / check_record_key(kind)

        def scan() -> list[Listed]:
            found = []
            for path in base.rglob("*.json") if base.is_dir() else ():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append(Listed(path.relative_to(base).as_posix()[: -len(".json")], stat.st_mtime, stat.st_size))
            return found

        return await asyncio.to_thread(scan)

    async def remove_record(self, kind: str, key: str) -> None:
        try:
            await asyncio.to_thread(self._record_path(kind, key).unlink, missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot remove record {kind}/{key}: {os_error_text(exc)}", exc.errno) from exc


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry is data of the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
