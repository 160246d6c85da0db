"""The Store contract: what every storage backend must do, as one suite of tests.

`condery.storage.Store` is the only thing the registry knows about storage, so every
backend must behave the same through it: blobs put from a file or from bytes read back
whole and by range; a missing blob is a KeyError from the reads and None from
`blob_info`; putting a stored digest again changes nothing; malformed digests and
record keys are refused with ValueError before anything is touched; a failed put says
which blob failed (never a server path) and leaves no part of the blob visible; records
round trip, are written atomically (last writer wins, a reader never sees half of
one), list sorted by prefix, and are removed as no-ops when absent; listings give write
times and sizes (what gc sweeps by); `verify_blob` tells good bytes from rotten ones;
`has_blob` is true only for a blob of the size its descriptor gives and removes one of
another size; every `remove_blob` moves `removal_generation`; `ping` answers;
`open_blob_file` gives a local file or None, as the backend declares.

`StoreContract` holds those cases. A backend's test file (tests/test_storage_<name>.py)
subclasses it as `Test<Name>Store`, which pytest collects, and provides, as fixtures
of that module:

- `store`: an open store of the backend, closed after the test. It may share its
  storage with other tests (S3 shares one bucket per session): the cases use fresh
  digests and record kinds, and list only with `<=`;
- `plant`: `plant(digest, data)` puts `data` under `digest` behind the store's back,
  as rot, a truncated copy or an operator's mistake would;

and sets the class attributes `local_files` (whether `open_blob_file` gives files)
and, if it stores blobs in parts, `part_size` (where a ranged read must cross a part
boundary). The backend's own cases (its layout, its failure modes, its crash litter)
stay beside the subclass, in its own file.

A new backend is done when its `Test<Name>Store` passes, with no case skipped or
overridden to weaken it: the registry relies on nothing else.

The helpers here (`digest_of`, `write`, `read_all`, `age`, ...) are shared by the
backends' files and by other storage tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from condery.storage import StorageError, Store

BAD_DIGESTS = ["sha256:abc", "sha512:" + "0" * 128, "sha256:" + "A" * 64, "sha256:" + "0" * 64 + "\n", "../etc/passwd"]
BAD_KEYS = ["", "/a", "a/", "a//b", "..", "a/../b", "./a", "a b", "a\nb", "a?b", "ä"]

RANGES = [
    (0, None),
    (1, None),
    (999, 2),  # across the first chunk boundary
    (1000, 1000),  # exactly one chunk
    (500, 3000),  # several chunks, unaligned at both ends
    (9999, None),  # the last byte
    (9990, 100),  # a length past the end is cut at the end
    (0, 0),
    (10_000, None),  # at the end: nothing
    (12_345, 10),  # past the end: nothing
]

Plant = Callable[[str, bytes], None]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unique_kind() -> str:
    # A store may be shared (one S3 bucket serves the whole session), so each test
    # lists records of its own kind.
    return "kind-" + uuid.uuid4().hex[:8]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def unreadable(path: Path) -> Path:
    """A name that exists but cannot be opened for reading: a unix socket (ENXIO)."""
    assert len(os.fsencode(path)) < 108, f"too long for a unix socket: {path}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


async def read_all(store: Store, digest: str, offset: int = 0, length: int | None = None, chunk: int = 1000) -> bytes:
    chunks = [c async for c in store.read_blob(digest, offset, length, chunk_size=chunk)]
    assert all(0 < len(c) <= chunk for c in chunks)
    return b"".join(chunks)


def age(path: Path, seconds: float) -> None:
    """Set the mtime of `path` and everything under it `seconds` into the past."""
    when = time.time() - seconds
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        # os.walk never follows symlinks (rglob's is_dir() does) and skips what vanished.
        for dirpath, dirnames, filenames in os.walk(path):
            entries += [Path(dirpath, name) for name in (*dirnames, *filenames)]
    for entry in entries:
        os.utime(entry, (when, when), follow_symlinks=False)


class StoreContract:
    """The cases every backend passes; subclass as `Test<Name>Store` (see the module)."""

    # Whether open_blob_file gives a local file (for sendfile) or always None.
    local_files: bool
    # A ranged read of a large blob crosses this offset (S3: where an upload part ends).
    part_size: int = 8 << 20

    # -- blobs -------------------------------------------------------------------------

    async def test_put_file_then_read_back(self, store: Store, tmp_path: Path) -> None:
        data = os.urandom(3 * 1024 * 1024 + 17)
        digest = digest_of(data)
        source = write(tmp_path / "layer", data)
        assert await store.blob_info(digest) is None
        await store.put_blob_file(digest, source)
        assert not source.exists()  # the store took the file
        info = await store.blob_info(digest)
        assert info is not None and (info.digest, info.size) == (digest, len(data))
        assert await store.get_blob_bytes(digest) == data
        assert await read_all(store, digest, chunk=64 * 1024) == data

    async def test_small_blob_bytes(self, store: Store) -> None:
        data = json.dumps({"config": uuid.uuid4().hex}).encode()
        digest = digest_of(data)
        await store.put_blob_bytes(digest, data)
        assert await store.get_blob_bytes(digest) == data
        empty = b""
        await store.put_blob_bytes(digest_of(empty), empty)
        assert await store.get_blob_bytes(digest_of(empty)) == b""
        info = await store.blob_info(digest_of(empty))
        assert info is not None and info.size == 0

    @pytest.mark.parametrize(("offset", "length"), RANGES)
    async def test_ranged_reads(self, store: Store, offset: int, length: int | None) -> None:
        data = os.urandom(10_000)
        digest = digest_of(data)
        await store.put_blob_bytes(digest, data)
        expected = data[offset:] if length is None else data[offset : offset + length]
        assert await read_all(store, digest, offset, length, chunk=1000) == expected

    async def test_missing_blob(self, store: Store) -> None:
        digest = digest_of(uuid.uuid4().bytes)
        assert await store.blob_info(digest) is None
        with pytest.raises(KeyError):
            await store.get_blob_bytes(digest)
        with pytest.raises(KeyError):
            await read_all(store, digest, 10, 5)
        with pytest.raises(KeyError):
            await read_all(store, digest, 0, 0)

    async def test_put_of_stored_digest_is_a_noop(self, store: Store, tmp_path: Path) -> None:
        data = os.urandom(4096)
        digest = digest_of(data)
        await store.put_blob_bytes(digest, data)
        # Content addressing: a second put under the same digest must not touch the stored
        # bytes (different bytes here only to make an overwrite visible), and still takes the file.
        other = write(tmp_path / "other", b"different bytes")
        await store.put_blob_file(digest, other)
        assert not other.exists()
        await store.put_blob_bytes(digest, b"more different bytes")
        assert await store.get_blob_bytes(digest) == data

    async def test_large_blob(self, store: Store, tmp_path: Path) -> None:
        data = os.urandom(20 * 1024 * 1024 + 3)
        digest = digest_of(data)
        await store.put_blob_file(digest, write(tmp_path / "big", data))
        info = await store.blob_info(digest)
        assert info is not None and info.size == len(data)
        hasher = hashlib.sha256()
        async for chunk in store.read_blob(digest):
            hasher.update(chunk)
        assert "sha256:" + hasher.hexdigest() == digest
        # A range that straddles a part boundary (S3: of the multipart upload, 8 MiB).
        boundary = self.part_size
        assert boundary + 5 < len(data)
        assert await read_all(store, digest, boundary - 5, 10, chunk=3) == data[boundary - 5 : boundary + 5]

    @pytest.mark.parametrize("bad", BAD_DIGESTS)
    async def test_invalid_digests_are_rejected(self, store: Store, bad: str, tmp_path: Path) -> None:
        with pytest.raises(ValueError):
            await store.blob_info(bad)
        with pytest.raises(ValueError):
            await store.has_blob(bad, 1)
        with pytest.raises(ValueError):
            await read_all(store, bad)
        with pytest.raises(ValueError):
            await store.verify_blob(bad)
        with pytest.raises(ValueError):
            await store.remove_blob(bad)
        with pytest.raises(ValueError):
            await store.put_blob_bytes(bad, b"x")
        source = write(tmp_path / "x", b"x")
        with pytest.raises(ValueError):
            await store.put_blob_file(bad, source)
        assert await store.blob_redirect_url(digest_of(b"x")) is None  # no redirects unless configured

    async def test_failed_put_names_the_blob_not_the_path(self, store: Store, tmp_path: Path) -> None:
        # Storage errors reach clients (503 UNAVAILABLE): no server path in them.
        missing = digest_of(b"nothing")
        source = tmp_path / "vanishing"
        with pytest.raises(StorageError) as caught:
            await store.put_blob_file(missing, source)  # the file does not exist
        assert str(tmp_path) not in str(caught.value)
        assert missing in str(caught.value)

    @pytest.mark.parametrize("source", ["missing", "unreadable"])
    async def test_failed_put_leaves_no_blob(self, store: Store, tmp_path: Path, source: str) -> None:
        """A put that cannot read its file fails whole: nothing under the digest, even in part."""
        digest = digest_of(uuid.uuid4().bytes)
        path = tmp_path / "layer" if source == "missing" else unreadable(tmp_path / "layer")
        with pytest.raises(StorageError) as caught:
            await store.put_blob_file(digest, path)
        assert digest in str(caught.value) and str(tmp_path) not in str(caught.value)
        assert await store.blob_info(digest) is None
        assert await store.has_blob(digest, 0) is False
        with pytest.raises(KeyError):
            await store.get_blob_bytes(digest)
        assert digest not in {d async for d in store.list_blobs()}

    async def test_open_blob_file_for_sendfile(self, store: Store, tmp_path: Path) -> None:
        """The server sends a local blob with sendfile from this file; a remote backend has none."""
        data = os.urandom(2 * 1024 * 1024 + 5)
        digest = digest_of(data)
        await store.put_blob_file(digest, write(tmp_path / "layer", data))
        handle = await store.open_blob_file(digest)
        if self.local_files:
            assert handle is not None
            with handle:
                assert handle.read() == data
            with pytest.raises(KeyError):
                await store.open_blob_file(digest_of(uuid.uuid4().bytes))
        else:
            assert handle is None  # streamed (or redirected) instead

    # -- integrity ---------------------------------------------------------------------

    async def test_verify_list_and_remove_blobs(self, store: Store, plant: Plant) -> None:
        good = os.urandom(5000)
        await store.put_blob_bytes(digest_of(good), good)
        bad_digest = digest_of(b"the real bytes")
        plant(bad_digest, b"the real byte")  # one byte short

        listed = {d async for d in store.list_blobs()}
        assert {digest_of(good), bad_digest} <= listed
        assert await store.verify_blob(digest_of(good)) is True
        assert await store.verify_blob(bad_digest) is False
        with pytest.raises(KeyError):
            await store.verify_blob(digest_of(uuid.uuid4().bytes))

        await store.remove_blob(bad_digest)
        await store.remove_blob(bad_digest)  # absent: a no-op
        assert await store.blob_info(bad_digest) is None
        assert bad_digest not in {d async for d in store.list_blobs()}

    async def test_remove_blob_moves_the_removal_generation(self, store: Store) -> None:
        """The builder caches "this image's blobs are all present" until the generation moves."""
        data = os.urandom(1000)
        digest = digest_of(data)
        await store.put_blob_bytes(digest, data)
        before = store.removal_generation
        await store.remove_blob(digest)
        assert store.removal_generation > before
        assert await store.blob_info(digest) is None

    async def test_has_blob_of_a_whole_blob(self, store: Store, tmp_path: Path) -> None:
        data = os.urandom(self.part_size + 1000)  # put from a file, in two parts if the backend has parts
        digest = digest_of(data)
        await store.put_blob_file(digest, write(tmp_path / "layer", data))
        before = store.removal_generation
        assert await store.has_blob(digest, len(data)) is True
        small = json.dumps({"config": uuid.uuid4().hex}).encode()
        await store.put_blob_bytes(digest_of(small), small)
        assert await store.has_blob(digest_of(small), len(small)) is True
        await store.put_blob_bytes(digest_of(b""), b"")
        assert await store.has_blob(digest_of(b""), 0) is True
        assert store.removal_generation == before  # nothing was removed
        assert await store.get_blob_bytes(digest_of(small)) == small

    async def test_has_blob_of_an_absent_blob(self, store: Store) -> None:
        digest = digest_of(uuid.uuid4().bytes)
        assert await store.has_blob(digest, 16) is False
        assert await store.blob_info(digest) is None

    async def test_has_blob_removes_a_blob_of_another_size(self, store: Store, plant: Plant) -> None:
        """A truncated copy cannot match its digest: removed, so it reads as a miss and is made again."""
        data = os.urandom(10_000)
        digest = digest_of(data)
        await store.put_blob_bytes(digest, data)
        plant(digest, data[:-1])  # truncated behind the store's back
        before = store.removal_generation
        assert await store.has_blob(digest, len(data)) is False
        assert await store.blob_info(digest) is None
        assert store.removal_generation > before
        assert digest not in {d async for d in store.list_blobs()}
        assert await store.has_blob(digest, len(data)) is False  # still a miss, not an error

        await store.put_blob_bytes(digest, data)  # made again
        assert await store.has_blob(digest, len(data)) is True
        assert await store.get_blob_bytes(digest) == data

    # -- records -----------------------------------------------------------------------

    async def test_records_round_trip(self, store: Store) -> None:
        kind = unique_kind()
        key = "conda-forge/linux-64/python-3.11.7=h1:0+x,y@z"
        assert await store.get_record(kind, key) is None
        value = {"b": [1, 2, {"c": None}], "a": "ü", "digest": digest_of(b"x")}
        await store.put_record(kind, key, value)
        assert await store.get_record(kind, key) == value
        await store.put_record(kind, key, {"replaced": True})  # last writer wins
        assert await store.get_record(kind, key) == {"replaced": True}
        assert await store.get_record(unique_kind(), key) is None

    async def test_concurrent_record_writes_leave_one_whole_value(self, store: Store) -> None:
        """Two writers race on one key while readers look: every read is None or one whole value."""
        kind, key = unique_kind(), "racing/key"
        values = [{"writer": n, "payload": str(n) * 300_000} for n in range(2)]
        for _ in range(5):
            results = await asyncio.gather(
                store.put_record(kind, key, values[0]),
                store.put_record(kind, key, values[1]),
                *[store.get_record(kind, key) for _ in range(4)],
            )
            for seen in results[2:]:
                assert seen is None or seen in values
            assert await store.get_record(kind, key) in values
        assert await store.list_records(kind) == [key]

    async def test_list_records(self, store: Store) -> None:
        kind, other = unique_kind(), unique_kind()
        keys = ["a", "a-b", "a/b/c", "a/b/d", "ab", "b:1+x"]
        for key in reversed(keys):
            await store.put_record(kind, key, {"key": key})
        await store.put_record(other, "a", {})
        assert await store.list_records(kind) == sorted(keys)
        assert await store.list_records(kind, "a") == ["a", "a-b", "a/b/c", "a/b/d", "ab"]
        assert await store.list_records(kind, "a/") == ["a/b/c", "a/b/d"]
        assert await store.list_records(kind, "a/b/c") == ["a/b/c"]
        assert await store.list_records(kind, "zzz") == []
        assert await store.list_records(unique_kind()) == []

    @pytest.mark.parametrize("bad", BAD_KEYS)
    async def test_invalid_record_keys_are_rejected(self, store: Store, bad: str) -> None:
        with pytest.raises(ValueError):
            await store.get_record("kind", bad)
        with pytest.raises(ValueError):
            await store.put_record("kind", bad, {})
        with pytest.raises(ValueError):
            await store.remove_record("kind", bad)
        with pytest.raises(ValueError):
            await store.get_record(bad, "key")
        with pytest.raises(ValueError):
            await store.list_records(bad)
        with pytest.raises(ValueError):
            await store.list_record_entries(bad)

    async def test_entries_with_times_and_sizes_and_record_removal(self, store: Store) -> None:
        """What gc lists and removes: blobs and records with their write time and size."""
        data = b"gc entry"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        kind = unique_kind()
        started = time.time() - 5  # S3 times are whole seconds
        await store.put_blob_bytes(digest, data)
        await store.put_record(kind, "a/b", {"x": 1})
        entries = {e.name: e async for e in store.list_blob_entries()}
        assert entries[digest].size == len(data) and started <= entries[digest].modified <= time.time() + 5
        records = await store.list_record_entries(kind)
        assert [r.name for r in records] == ["a/b"] and records[0].size > 0 and records[0].modified >= started
        await store.remove_record(kind, "a/b")
        await store.remove_record(kind, "a/b")  # absent: a no-op
        assert await store.get_record(kind, "a/b") is None
        assert await store.list_record_entries(kind) == []
        assert await store.list_record_entries(unique_kind()) == []  # never written

    # -- health ------------------------------------------------------------------------

    async def test_ping_answers_when_the_store_takes_writes(self, store: Store) -> None:
        await store.ping()
        await store.ping()  # nothing left behind that a second probe would trip over
