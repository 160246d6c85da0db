"""The embedded default store: a directory tree.

    ROOT/blobs/sha256/<hex>          content-addressed blobs
    ROOT/records/<kind>/<key>.json   JSON records
    ROOT/tmp/                        staging for atomic writes (same filesystem)

Atomicity comes from writing under ROOT/tmp and `os.replace`-ing into place, so a crash
leaves at worst an orphan in tmp/, never a partial blob or record.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

from condery.storage import BlobInfo, Store, StorageError, check_digest, check_record_key


class FilesystemStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.tmp = self.root / "tmp"
        for sub in ("blobs/sha256", "records", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

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

    async def read_blob(
        self, digest: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        path = self._blob_path(digest)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise KeyError(digest) from None
        with handle:
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

    async def put_blob_file(self, digest: str, path: Path) -> None:
        target = self._blob_path(digest)
        if target.exists():
            Path(path).unlink(missing_ok=True)
            return
        await asyncio.to_thread(self._move_in, Path(path), target)

    def _move_in(self, source: Path, target: Path) -> None:
        try:
            if source.stat().st_dev == self.tmp.stat().st_dev:
                os.replace(source, target)
                return
            fd, staged = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
            os.close(fd)
            shutil.copyfile(source, staged)
            os.replace(staged, target)
            source.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot store blob {target.name}: {exc}") from exc

    async def _put_small_blob(self, digest: str, data: bytes) -> None:
        target = self._blob_path(digest)
        if not target.exists():
            await asyncio.to_thread(self._write_atomic, target, data)

    def _write_atomic(self, target: Path, data: bytes) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, staged = tempfile.mkstemp(dir=self.tmp, prefix="w-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staged, target)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc}") from exc

    async def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self._record_path(kind, key)
        try:
            text = await asyncio.to_thread(path.read_text)
        except FileNotFoundError:
            return None
        return json.loads(text)

    async def put_record(self, kind: str, key: str, value: dict[str, Any]) -> None:
        data = json.dumps(value, sort_keys=True).encode()
        await asyncio.to_thread(self._write_atomic, self._record_path(kind, key), data)

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
